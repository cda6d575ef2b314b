"""gRPC server reflection on an aio channel, typed: the typeshed stub of ServerReflectionStub
takes only a sync channel and leaves its method untyped, so tests build the call as the generated
stub does."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection_pb2

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


def reflection_info(
    channel: grpc.aio.Channel,
) -> grpc.aio.StreamStreamMultiCallable[Request, Response]:
    return channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
