"""The HTTP gateway (issue 3): maps the AI SDK chat routes onto relay RPCs."""
