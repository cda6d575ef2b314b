"""The gRPC service: RPCs translated to domain calls, domain errors to status codes."""
