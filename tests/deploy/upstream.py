"""A stand-in for TF Serving where a test needs only a reachable upstream, not a model.

Answers every Predict with a fixed PredictResponse whose model_spec.name is
``FakeUpstream.MODEL``; listens on a unix socket (``unix:PATH``, as TF Serving
does in the pod) or on loopback TCP (``127.0.0.1:0``).
"""

from __future__ import annotations

from concurrent import futures

import grpc

from protos import predict_pb2


class FakeUpstream:
    MODEL = "over-the-socket"

    def __init__(self, address: str) -> None:
        self.address = address
        answer = predict_pb2.PredictResponse()
        answer.model_spec.name = self.MODEL
        raw = answer.SerializeToString()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "tensorflow.serving.PredictionService",
            {"Predict": grpc.unary_unary_rpc_method_handler(lambda request, context: raw)},
        ),))
        self.port = 0

    def start(self) -> FakeUpstream:
        self.port = self.server.add_insecure_port(self.address)
        assert self.port != 0, f"cannot bind {self.address}"
        self.server.start()
        return self

    def target(self) -> str:
        """The gateway's upstream.target for this server."""
        if self.address.startswith("unix:"):
            return "unix://" + self.address.removeprefix("unix:")
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)
