"""The relay's domain: streams, their lifecycles and the storage ports, free of gRPC and HTTP."""
