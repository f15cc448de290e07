"""``python -m gateway.floor``: the least a grpc.aio proxy can do, as the benchmark's floor.

``tfshield bench`` runs this beside the gateway so that every run measures,
on the same machine and in the same alternating rounds, what the runtime
itself costs: a grpc.aio server that forwards each unary call's bytes upstream
over grpc.aio channels and hands the answer back. It does only what a drop-in proxy
must do to be correct, nothing a security gateway adds:

- the request bytes go upstream unparsed, the response bytes come back unparsed;
- the client's custom metadata and remaining deadline go upstream;
- the upstream's initial and trailing metadata, status code and message come back;
- every method path is forwarded (one generic handler);
- the gateway's defaults for everything else: its gRPC I/O path (the
  ``GRPC_EXPERIMENTS`` default ``tfshield serve`` sets, :mod:`gateway.cli`),
  its event loop (uvloop when installed), its server and channel options
  (:func:`gateway.server.server_options`, :func:`gateway.forward.channel_options`:
  message limits, keepalive, no retries), as many upstream connections as its pool, used round-robin,
  and its frozen start-up objects (:func:`gateway.server.freeze_startup_objects`),
  so the two differ only in the gateway's own work.

No client identity, no decode or validation, no policy, no metrics, no health
service: the gateway's added latency minus this one's is what tfshield's own
logic costs, and this one's added latency is what a Python grpc.aio proxy
with the gateway's settings costs at least on that machine.

It is a benchmark reference, not a product: no TLS, no drain on SIGTERM (it
exits), loopback only. Started with ``--upstream HOST:PORT --port 0
--ready-file F``; once listening it writes ``{"pid", "grpc_port",
"event_loop", "grpc_experiments"}`` to F, as ``tfshield serve`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys

if __name__ == "__main__":
    # A process of its own: the same gRPC I/O path as `tfshield serve`, chosen
    # before grpc loads (an explicit setting wins there too).
    from gateway.cli import use_gateway_grpc_io_path

    use_gateway_grpc_io_path()

import grpc  # noqa: E402

from gateway.config import GatewayConfig  # noqa: E402
from gateway.forward import channel_options, forwardable, relay_metadata  # noqa: E402
from gateway.readyfile import write_ready_file  # noqa: E402
from gateway.server import event_loop_factory, freeze_startup_objects, server_options  # noqa: E402


class _ForwardEverything(grpc.GenericRpcHandler):
    """A unary-unary handler for any method path, forwarding to ``channels`` in turn."""

    def __init__(self, channels: list[grpc.aio.Channel]) -> None:
        self._channels = channels
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        path = handler_call_details.method
        handler = self._handlers.get(path)
        if handler is None:
            handler = self._handlers[path] = grpc.unary_unary_rpc_method_handler(self._forwarder(path))
        return handler

    def _forwarder(self, path: str):  # type: ignore[no-untyped-def]
        # No (de)serialisers: bytes in, bytes out.
        upstreams = itertools.cycle([channel.unary_unary(path) for channel in self._channels])

        async def forward(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            call = next(upstreams)(
                raw, metadata=forwardable(context.invocation_metadata()), timeout=context.time_remaining()
            )
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                trailing = exc.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(tuple(trailing))
                await context.abort(exc.code(), exc.details() or "")
            await relay_metadata(call, context)
            return response

        return forward


async def serve(upstream: str, listen: str, ready_file: str | None, loop_name: str) -> None:
    config = GatewayConfig()  # the gateway's defaults
    channels = [
        grpc.aio.insecure_channel(upstream, options=channel_options(config, index))
        for index in range(config.upstream.channels)
    ]
    server = grpc.aio.server(options=server_options(config))
    server.add_generic_rpc_handlers((_ForwardEverything(channels),))
    port = server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"gateway.floor: cannot bind {listen}")
    await server.start()
    frozen = freeze_startup_objects()  # as tfshield serve does
    if ready_file:
        write_ready_file(
            ready_file,
            grpc_port=port,
            event_loop=loop_name,
            grpc_experiments=os.environ.get("GRPC_EXPERIMENTS", ""),
            gc_frozen=frozen,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)
    for channel in channels:
        await channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.floor",
        description="A bare grpc.aio byte-forwarding proxy: the benchmark's floor for a Python gRPC proxy.",
    )
    parser.add_argument("--upstream", required=True, help="gRPC address to forward to, host:port")
    parser.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (default 0: ephemeral)")
    parser.add_argument("--ready-file", help="write {pid, grpc_port, event_loop} here once listening")
    args = parser.parse_args(argv)
    loop_factory, loop_name = event_loop_factory(GatewayConfig().event_loop)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.upstream, f"127.0.0.1:{args.port}", args.ready_file, loop_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
