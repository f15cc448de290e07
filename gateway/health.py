"""grpc.health.v1.Health for the gateway: SERVING only while the upstream is reachable.

Kubernetes gRPC probes and load balancers ask ``Check``; ``Watch`` streams
changes. The status follows the upstream connection: a gateway whose model
server is gone cannot serve, so it says NOT_SERVING and takes itself out of
rotation. Service names accepted: "" (the whole server), the two TF Serving
services by full name, and the short names TF Serving itself registers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from protos import health_pb2

SERVICE_NAME = "grpc.health.v1.Health"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
KNOWN_SERVICES = frozenset(
    {
        "",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "PredictionService",
        "ModelService",
    }
)


class HealthService:
    def __init__(self) -> None:
        self._serving = False
        self._shutting_down = False
        self._changed = asyncio.Event()

    @property
    def serving(self) -> bool:
        return self._serving and not self._shutting_down

    def set_serving(self, serving: bool) -> None:
        if serving != self._serving:
            self._serving = serving
            self._notify()

    def shut_down(self) -> None:
        """NOT_SERVING from now on, whatever the upstream does (drain on SIGTERM)."""
        self._shutting_down = True
        self._notify()

    def _notify(self) -> None:
        # Each watcher waits on the event that was current when it last looked;
        # replacing it (rather than clearing it) wakes every watcher exactly once.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _response(self) -> bytes:
        status = SERVING if self.serving else NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status).SerializeToString()

    async def _service(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        if request.service not in KNOWN_SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")

    async def check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> bytes:
        await self._service(request, context)
        return self._response()

    async def watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        await self._service(request, context)
        last = None
        while True:
            changed = self._changed
            current = self._response()
            if current != last:
                yield current
                last = current
            await changed.wait()

    def handler(self) -> grpc.GenericRpcHandler:
        parse = health_pb2.HealthCheckRequest.FromString
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Check": grpc.unary_unary_rpc_method_handler(self.check, request_deserializer=parse),
                "Watch": grpc.unary_stream_rpc_method_handler(self.watch, request_deserializer=parse),
            },
        )
