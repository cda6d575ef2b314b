"""Translation between protobuf messages and the domain's values, for the service and the client."""

from __future__ import annotations

from relay.domain.model import (
    Limits,
    StopOutcome,
    StreamEnd,
    StreamState,
    UIMessage,
    dump_json,
    parse_message,
)
from relay.v1 import relay_pb2 as pb

# Initial metadata of an accepted Attach: the id of the stream it reads.
STREAM_ID_METADATA = "x-stream-id"
# Call metadata: the subject a call acts for, percent-encoded (metadata values are ASCII; a
# subject, e.g. a JWT's `sub`, may not be). See relay.proto, "Authentication".
SUBJECT_METADATA = "x-relay-subject"

ROLE_TO_PB = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
ROLE_FROM_PB = {value: name for name, value in ROLE_TO_PB.items()}
STATE_TO_PB = {
    StreamState.LIVE: pb.STREAM_STATE_LIVE,
    StreamState.COMPLETED: pb.STREAM_STATE_COMPLETED,
    StreamState.STOPPED: pb.STREAM_STATE_STOPPED,
    StreamState.FAILED: pb.STREAM_STATE_FAILED,
    StreamState.INTERRUPTED: pb.STREAM_STATE_INTERRUPTED,
}
STATE_FROM_PB = {value: state for state, value in STATE_TO_PB.items()}
OUTCOME_TO_PB = {
    StopOutcome.STOPPED: pb.STOP_OUTCOME_STOPPED,
    StopOutcome.ALREADY_ENDED: pb.STOP_OUTCOME_ALREADY_ENDED,
    StopOutcome.NO_ACTIVE_STREAM: pb.STOP_OUTCOME_NO_ACTIVE_STREAM,
    StopOutcome.NOT_ACTIVE: pb.STOP_OUTCOME_NOT_ACTIVE,
}
OUTCOME_FROM_PB = {value: outcome for outcome, value in OUTCOME_TO_PB.items()}


def message_from_pb(message: pb.UIMessage, limits: Limits) -> UIMessage:
    role = ROLE_FROM_PB.get(message.role, "")
    return parse_message(message.id, role, message.parts_json, message.metadata_json, limits)


def message_to_pb(message: UIMessage) -> pb.UIMessage:
    return pb.UIMessage(
        id=message.id,
        role=ROLE_TO_PB[message.role],
        parts_json=dump_json(message.parts),
        metadata_json="" if message.metadata is None else dump_json(message.metadata),
    )


def end_from_pb(end: pb.StreamEnd, limits: Limits) -> StreamEnd:
    message = message_from_pb(end.message, limits) if end.HasField("message") else None
    return StreamEnd(STATE_FROM_PB[end.state], end.final_offset, end.error_message, message)


def end_to_pb(end: StreamEnd) -> pb.StreamEnd:
    return pb.StreamEnd(
        state=STATE_TO_PB[end.state],
        final_offset=end.final_offset,
        error_message=end.error_message,
        message=None if end.message is None else message_to_pb(end.message),
    )
