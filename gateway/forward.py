"""The forward stage: the terminal call to the upstream model server.

Requests go upstream as the bytes the client sent (DESIGN.md, decision 2) over
a small pool of HTTP/2 connections, round-robin: one connection serialises
its streams through one socket and one HTTP/2 flow-control window, and TF
Serving's batching needs concurrent requests to do its job.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import grpc

from gateway.config import GatewayConfig, TlsClientConfig

Metadata = Sequence[tuple[str, str | bytes]]

# Metadata the gateway must not copy onto its own upstream call: HTTP/2
# pseudo-headers, gRPC's own headers, and the transport headers gRPC sets itself.
_HOP_BY_HOP = frozenset({"user-agent", "content-type", "te", "host", "accept-encoding", "content-length"})


def forwardable(metadata: Metadata | None) -> tuple[tuple[str, str | bytes], ...]:
    """The client's custom metadata, as it may be sent on to the upstream."""
    if not metadata:
        return ()
    return tuple(
        (key, value)
        for key, value in metadata
        if not key.startswith((":", "grpc-")) and key not in _HOP_BY_HOP
    )


async def relay_metadata(upstream_call: grpc.aio.UnaryUnaryCall, context: grpc.aio.ServicerContext) -> None:
    """Pass a finished upstream call's initial and trailing metadata back to the client."""
    initial = await upstream_call.initial_metadata()
    if initial:
        await context.send_initial_metadata(tuple(initial))
    trailing = await upstream_call.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(tuple(trailing))


def channel_options(config: GatewayConfig, index: int) -> list[tuple[str, int | str]]:
    limit = config.limits.max_message_bytes
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Without a local subchannel pool, channels with equal arguments share one connection.
        ("grpc.use_local_subchannel_pool", 1),
        ("tfshield.channel_index", index),
        # Never retry on the gateway's behalf: an UNAVAILABLE from a full batch
        # queue upstream must reach the client, not be amplified.
        ("grpc.enable_retries", 0),
        # The upstream is a sidecar on loopback: when it (re)starts, reconnect
        # within a second rather than after gRPC's default backoff of up to 2 minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if config.keepalive.time_s > 0:
        options += [
            ("grpc.keepalive_time_ms", int(config.keepalive.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive.timeout_s * 1000)),
        ]
    tls = config.upstream.tls
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def channel_credentials(tls: TlsClientConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )


class UpstreamPool:
    """A fixed set of channels to the upstream, used round-robin."""

    def __init__(self, config: GatewayConfig) -> None:
        upstream = config.upstream
        credentials = channel_credentials(upstream.tls) if upstream.tls is not None else None
        self.channels: list[grpc.aio.Channel] = []
        for index in range(upstream.channels):
            options = channel_options(config, index)
            if credentials is None:
                channel = grpc.aio.insecure_channel(upstream.target, options=options)
            else:
                channel = grpc.aio.secure_channel(upstream.target, credentials, options=options)
            self.channels.append(channel)
        self._next = itertools.cycle(range(len(self.channels)))
        self._callables: dict[tuple[int, str], grpc.aio.UnaryUnaryMultiCallable] = {}

    def callable_for(self, path: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """A bytes-in, bytes-out callable for ``path`` on the next ready channel.

        Channels that are not READY (still backing off after the upstream
        restarted) are skipped while another one is READY, so a request never
        fails on one connection while the upstream is reachable on another.
        """
        ready = grpc.ChannelConnectivity.READY
        for _ in range(len(self.channels)):
            index = next(self._next)
            if self.channels[index].get_state() == ready:
                break
        key = (index, path)
        stub = self._callables.get(key)
        if stub is None:
            # No (de)serializers: the request and response stay raw bytes.
            stub = self._callables[key] = self.channels[index].unary_unary(path)
        return stub

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
