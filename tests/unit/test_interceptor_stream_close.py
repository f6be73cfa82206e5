"""A streaming call the client cancelled is closed by gRPC wherever its generator is finalized,
which may be another context than the one the interceptor set its caller in: finishing the call
there must not raise (it did: "Token was created in a different Context", logged as a task's
exception never retrieved, each time a console page left a segment's live feed)."""

from __future__ import annotations

import contextvars
import time
from typing import Any, cast

import grpc

from shared.auth import set_current_caller
from shared.interceptors import ServerInterceptor, StreamGate


class ContextWithoutCode:
    """The part of a grpc.aio.ServicerContext _finish reads."""

    def code(self) -> None:
        return None


def test_a_call_finished_in_another_context_than_its_caller_s_finishes_quietly() -> None:
    interceptor = ServerInterceptor(authenticator=cast(Any, None), streams=StreamGate(1))
    token = contextvars.copy_context().run(set_current_caller, None)
    interceptor._finish(
        "/profiles.segments.v1.SegmentsService/WatchSegmentChanges",
        grpc.StatusCode.CANCELLED,
        time.perf_counter(),
        token,
        cast(Any, ContextWithoutCode()),
    )
