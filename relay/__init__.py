"""stream-relay: resumable LLM answer streams. A gRPC relay owning producers and a replay buffer."""
