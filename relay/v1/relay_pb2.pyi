from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_SYSTEM: _ClassVar[Role]
    ROLE_USER: _ClassVar[Role]
    ROLE_ASSISTANT: _ClassVar[Role]

class StreamState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_STATE_UNSPECIFIED: _ClassVar[StreamState]
    STREAM_STATE_LIVE: _ClassVar[StreamState]
    STREAM_STATE_COMPLETED: _ClassVar[StreamState]
    STREAM_STATE_STOPPED: _ClassVar[StreamState]
    STREAM_STATE_FAILED: _ClassVar[StreamState]
    STREAM_STATE_INTERRUPTED: _ClassVar[StreamState]

class ReplayMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLAY_MODE_UNSPECIFIED: _ClassVar[ReplayMode]
    REPLAY_MODE_EXACT: _ClassVar[ReplayMode]
    REPLAY_MODE_PART_SAFE: _ClassVar[ReplayMode]
    REPLAY_MODE_COMPACT: _ClassVar[ReplayMode]

class EndReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    END_REASON_UNSPECIFIED: _ClassVar[EndReason]
    END_REASON_FINISHED: _ClassVar[EndReason]
    END_REASON_STOP: _ClassVar[EndReason]
    END_REASON_SUPERSEDED: _ClassVar[EndReason]
    END_REASON_STOPPED_BEFORE_START: _ClassVar[EndReason]
    END_REASON_NO_READER: _ClassVar[EndReason]
    END_REASON_MAX_DURATION: _ClassVar[EndReason]
    END_REASON_MAX_CHUNKS: _ClassVar[EndReason]
    END_REASON_PRODUCER_FAILED: _ClassVar[EndReason]
    END_REASON_LIMIT: _ClassVar[EndReason]
    END_REASON_SHUTDOWN: _ClassVar[EndReason]
    END_REASON_RELAY_LOST: _ClassVar[EndReason]

class StopOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_OUTCOME_UNSPECIFIED: _ClassVar[StopOutcome]
    STOP_OUTCOME_STOPPED: _ClassVar[StopOutcome]
    STOP_OUTCOME_ALREADY_ENDED: _ClassVar[StopOutcome]
    STOP_OUTCOME_NO_ACTIVE_STREAM: _ClassVar[StopOutcome]
    STOP_OUTCOME_NOT_ACTIVE: _ClassVar[StopOutcome]
    STOP_OUTCOME_STOPPED_BEFORE_START: _ClassVar[StopOutcome]
ROLE_UNSPECIFIED: Role
ROLE_SYSTEM: Role
ROLE_USER: Role
ROLE_ASSISTANT: Role
STREAM_STATE_UNSPECIFIED: StreamState
STREAM_STATE_LIVE: StreamState
STREAM_STATE_COMPLETED: StreamState
STREAM_STATE_STOPPED: StreamState
STREAM_STATE_FAILED: StreamState
STREAM_STATE_INTERRUPTED: StreamState
REPLAY_MODE_UNSPECIFIED: ReplayMode
REPLAY_MODE_EXACT: ReplayMode
REPLAY_MODE_PART_SAFE: ReplayMode
REPLAY_MODE_COMPACT: ReplayMode
END_REASON_UNSPECIFIED: EndReason
END_REASON_FINISHED: EndReason
END_REASON_STOP: EndReason
END_REASON_SUPERSEDED: EndReason
END_REASON_STOPPED_BEFORE_START: EndReason
END_REASON_NO_READER: EndReason
END_REASON_MAX_DURATION: EndReason
END_REASON_MAX_CHUNKS: EndReason
END_REASON_PRODUCER_FAILED: EndReason
END_REASON_LIMIT: EndReason
END_REASON_SHUTDOWN: EndReason
END_REASON_RELAY_LOST: EndReason
STOP_OUTCOME_UNSPECIFIED: StopOutcome
STOP_OUTCOME_STOPPED: StopOutcome
STOP_OUTCOME_ALREADY_ENDED: StopOutcome
STOP_OUTCOME_NO_ACTIVE_STREAM: StopOutcome
STOP_OUTCOME_NOT_ACTIVE: StopOutcome
STOP_OUTCOME_STOPPED_BEFORE_START: StopOutcome

class UIMessage(_message.Message):
    __slots__ = ("id", "role", "parts_json", "metadata_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PARTS_JSON_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    role: Role
    parts_json: str
    metadata_json: str
    def __init__(self, id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., parts_json: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("chat_id", "messages", "replace_history", "producer", "options", "supersede", "request_id", "policy")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    REPLACE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    chat_id: str
    messages: _containers.RepeatedCompositeFieldContainer[UIMessage]
    replace_history: bool
    producer: str
    options: _containers.ScalarMap[str, str]
    supersede: bool
    request_id: str
    policy: StreamPolicy
    def __init__(self, chat_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[UIMessage, _Mapping]]] = ..., replace_history: _Optional[bool] = ..., producer: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ..., supersede: _Optional[bool] = ..., request_id: _Optional[str] = ..., policy: _Optional[_Union[StreamPolicy, _Mapping]] = ...) -> None: ...

class StreamPolicy(_message.Message):
    __slots__ = ("no_reader_grace_s", "max_duration_s", "max_chunks", "retention_s")
    NO_READER_GRACE_S_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    RETENTION_S_FIELD_NUMBER: _ClassVar[int]
    no_reader_grace_s: float
    max_duration_s: float
    max_chunks: int
    retention_s: float
    def __init__(self, no_reader_grace_s: _Optional[float] = ..., max_duration_s: _Optional[float] = ..., max_chunks: _Optional[int] = ..., retention_s: _Optional[float] = ...) -> None: ...

class StartResponse(_message.Message):
    __slots__ = ("stream_id", "deduplicated", "superseded_stream_id", "stopped_before_start")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    STOPPED_BEFORE_START_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    deduplicated: bool
    superseded_stream_id: str
    stopped_before_start: bool
    def __init__(self, stream_id: _Optional[str] = ..., deduplicated: _Optional[bool] = ..., superseded_stream_id: _Optional[str] = ..., stopped_before_start: _Optional[bool] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("stream_id", "chat_id", "from_offset", "max_batch", "replay")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    chat_id: str
    from_offset: int
    max_batch: int
    replay: ReplayMode
    def __init__(self, stream_id: _Optional[str] = ..., chat_id: _Optional[str] = ..., from_offset: _Optional[int] = ..., max_batch: _Optional[int] = ..., replay: _Optional[_Union[ReplayMode, str]] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("chunks", "end")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    chunks: ChunkBatch
    end: StreamEnd
    def __init__(self, chunks: _Optional[_Union[ChunkBatch, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ...) -> None: ...

class AttachManyRequest(_message.Message):
    __slots__ = ("subscribe", "unsubscribe")
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    subscribe: Subscribe
    unsubscribe: Unsubscribe
    def __init__(self, subscribe: _Optional[_Union[Subscribe, _Mapping]] = ..., unsubscribe: _Optional[_Union[Unsubscribe, _Mapping]] = ...) -> None: ...

class Subscribe(_message.Message):
    __slots__ = ("tag", "attach", "subject")
    TAG_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    tag: int
    attach: AttachRequest
    subject: str
    def __init__(self, tag: _Optional[int] = ..., attach: _Optional[_Union[AttachRequest, _Mapping]] = ..., subject: _Optional[str] = ...) -> None: ...

class Unsubscribe(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: int
    def __init__(self, tag: _Optional[int] = ...) -> None: ...

class AttachManyResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[ReaderEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[ReaderEvent, _Mapping]]] = ...) -> None: ...

class ReaderEvent(_message.Message):
    __slots__ = ("tag", "subscribed", "refused", "chunks", "end")
    TAG_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    tag: int
    subscribed: Subscribed
    refused: Refused
    chunks: ChunkBatch
    end: StreamEnd
    def __init__(self, tag: _Optional[int] = ..., subscribed: _Optional[_Union[Subscribed, _Mapping]] = ..., refused: _Optional[_Union[Refused, _Mapping]] = ..., chunks: _Optional[_Union[ChunkBatch, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ...) -> None: ...

class Subscribed(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    def __init__(self, stream_id: _Optional[str] = ...) -> None: ...

class Refused(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ChunkBatch(_message.Message):
    __slots__ = ("first_offset", "chunks", "offsets")
    FIRST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    first_offset: int
    chunks: _containers.RepeatedScalarFieldContainer[str]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, first_offset: _Optional[int] = ..., chunks: _Optional[_Iterable[str]] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("state", "final_offset", "error_message", "message", "reason")
    STATE_FIELD_NUMBER: _ClassVar[int]
    FINAL_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    state: StreamState
    final_offset: int
    error_message: str
    message: UIMessage
    reason: EndReason
    def __init__(self, state: _Optional[_Union[StreamState, str]] = ..., final_offset: _Optional[int] = ..., error_message: _Optional[str] = ..., message: _Optional[_Union[UIMessage, _Mapping]] = ..., reason: _Optional[_Union[EndReason, str]] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("chat_id", "stream_id", "partial_message", "request_id", "message_id")
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    chat_id: str
    stream_id: str
    partial_message: UIMessage
    request_id: str
    message_id: str
    def __init__(self, chat_id: _Optional[str] = ..., stream_id: _Optional[str] = ..., partial_message: _Optional[_Union[UIMessage, _Mapping]] = ..., request_id: _Optional[str] = ..., message_id: _Optional[str] = ...) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ("outcome", "stream_id", "end", "usage_json")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    USAGE_JSON_FIELD_NUMBER: _ClassVar[int]
    outcome: StopOutcome
    stream_id: str
    end: StreamEnd
    usage_json: str
    def __init__(self, outcome: _Optional[_Union[StopOutcome, str]] = ..., stream_id: _Optional[str] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ..., usage_json: _Optional[str] = ...) -> None: ...

class GetActiveRequest(_message.Message):
    __slots__ = ("chat_id",)
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    chat_id: str
    def __init__(self, chat_id: _Optional[str] = ...) -> None: ...

class GetActiveResponse(_message.Message):
    __slots__ = ("stream_id", "state", "offset")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    state: StreamState
    offset: int
    def __init__(self, stream_id: _Optional[str] = ..., state: _Optional[_Union[StreamState, str]] = ..., offset: _Optional[int] = ...) -> None: ...

class ListMessagesRequest(_message.Message):
    __slots__ = ("chat_id",)
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    chat_id: str
    def __init__(self, chat_id: _Optional[str] = ...) -> None: ...

class ListMessagesResponse(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[UIMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[UIMessage, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("live_streams", "retained_streams", "readers", "buffered_chunks", "ended_by_reason")
    class EndedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    RETAINED_STREAMS_FIELD_NUMBER: _ClassVar[int]
    READERS_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ENDED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    live_streams: int
    retained_streams: int
    readers: int
    buffered_chunks: int
    ended_by_reason: _containers.ScalarMap[str, int]
    def __init__(self, live_streams: _Optional[int] = ..., retained_streams: _Optional[int] = ..., readers: _Optional[int] = ..., buffered_chunks: _Optional[int] = ..., ended_by_reason: _Optional[_Mapping[str, int]] = ...) -> None: ...
