"""Translation between protobuf messages and the domain's values, for the service and the client."""

from __future__ import annotations

from typing import Any

from relay.domain.model import (
    ChunkBatch,
    EndReason,
    Limits,
    ReplayMode,
    StopOutcome,
    StreamEnd,
    StreamPolicy,
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
    StopOutcome.STOPPED_BEFORE_START: pb.STOP_OUTCOME_STOPPED_BEFORE_START,
}
OUTCOME_FROM_PB = {value: outcome for outcome, value in OUTCOME_TO_PB.items()}
REASON_TO_PB: dict[EndReason, Any] = {
    reason: pb.EndReason.Value(f"END_REASON_{reason.name}") for reason in EndReason
}
REASON_FROM_PB = {value: reason for reason, value in REASON_TO_PB.items()}
REPLAY_TO_PB: dict[ReplayMode, Any] = {
    mode: pb.ReplayMode.Value(f"REPLAY_MODE_{mode.name}") for mode in ReplayMode
}
REPLAY_FROM_PB = {value: mode for mode, value in REPLAY_TO_PB.items()}
REPLAY_FROM_PB[pb.REPLAY_MODE_UNSPECIFIED] = ReplayMode.EXACT


def batch_from_pb(batch: pb.ChunkBatch) -> ChunkBatch:
    return ChunkBatch(
        batch.first_offset, list(batch.chunks), list(batch.offsets) if batch.offsets else None
    )


def fill_batch(target: pb.ChunkBatch, batch: ChunkBatch) -> None:
    """Fills `target` in place: building a ChunkBatch and then its parent copies every chunk
    twice."""
    target.first_offset = batch.first_offset
    target.chunks.extend(batch.chunks)
    if batch.offsets is not None:
        target.offsets.extend(batch.offsets)


def policy_from_pb(policy: pb.StreamPolicy) -> StreamPolicy:
    """Unset (0) fields are None: the relay's default."""
    return StreamPolicy(
        no_reader_grace_s=policy.no_reader_grace_s or None,
        max_duration_s=policy.max_duration_s or None,
        max_chunks=policy.max_chunks or None,
        retention_s=policy.retention_s or None,
    )


def policy_to_pb(policy: StreamPolicy) -> pb.StreamPolicy:
    return pb.StreamPolicy(
        no_reader_grace_s=policy.no_reader_grace_s or 0.0,
        max_duration_s=policy.max_duration_s or 0.0,
        max_chunks=policy.max_chunks or 0,
        retention_s=policy.retention_s or 0.0,
    )


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
    reason = REASON_FROM_PB.get(end.reason, EndReason.UNSPECIFIED)
    return StreamEnd(STATE_FROM_PB[end.state], end.final_offset, end.error_message, message, reason)


def end_to_pb(end: StreamEnd) -> pb.StreamEnd:
    return pb.StreamEnd(
        state=STATE_TO_PB[end.state],
        final_offset=end.final_offset,
        error_message=end.error_message,
        message=None if end.message is None else message_to_pb(end.message),
        reason=REASON_TO_PB[end.reason],
    )
