"""The `openai` producer, in its parts, each readable alone:

- producer.py: `OpenAIProducer`, its options, the request body and the HTTP request (one pooled
  client per profile, the idle timeout, upstream failures as the stream's error);
- sse.py: the SSE event parser (body bytes -> server-sent events);
- chunks.py: the chunk translator (upstream events -> AI SDK UI message chunks);
- messages.py: message conversion (UI messages -> chat-completions messages);
- errors.py: `Failure` and the text of upstream errors, which the others share.
"""

from relay.producers.openai.producer import OPTIONS, OpenAIProducer

__all__ = ["OPTIONS", "OpenAIProducer"]
