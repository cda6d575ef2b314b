"""Implementations of the storage ports (`relay.domain.ports`): SQLite (embedded), Redis Streams and
PostgreSQL (cluster)."""
