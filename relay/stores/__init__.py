"""Implementations of the storage ports (`relay.ports`): SQLite (embedded), Redis Streams and
PostgreSQL (cluster)."""
