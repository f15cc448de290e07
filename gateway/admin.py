"""``tfshield admin``: the control API from the command line.

::

    tfshield admin [--control HOST:PORT] [--token-file FILE] [--ca CA [--cert CERT --key KEY]]
                   [--json] COMMAND
      get-client ID                            a client's risk and the monitor risks behind it
      list-clients [--limit N] [--min-risk X]  the riskiest clients, highest first
      reset-client ID                          forget a client's monitor state
      get-policy                               the policy in force (YAML on stdout, digest on stderr)
      reload-policy [FILE]                     send FILE as the new policy, or make the gateway
                                               re-read its own policy file

The token comes from ``--token-file`` or the ``TFSHIELD_ADMIN_TOKEN``
environment variable (never from the command line, where ``ps`` would show
it). ``--ca`` turns TLS on; ``--cert``/``--key`` add a client certificate for
mTLS. Exit status: 0 done, 1 the call failed (the gRPC status and message are
printed), 2 usage or local file errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from protos import control_pb2

TOKEN_ENV = "TFSHIELD_ADMIN_TOKEN"
CONTROL_ENV = "TFSHIELD_CONTROL"
DEFAULT_CONTROL = "127.0.0.1:8510"
SERVICE = "/tfshield.control.v1.Control/"


class UsageError(Exception):
    pass


def _when(unix_s: float) -> str:
    if not unix_s:
        return "-"
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        lines = _read(args.token_file, "token file").decode().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise UsageError(f"token file {args.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.cert or args.key:
        if not (args.cert and args.key and args.ca):
            raise UsageError("--cert and --key go together, and need --ca")
    if args.ca:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(args.ca, "CA file"),
            private_key=_read(args.key, "key file") if args.key else None,
            certificate_chain=_read(args.cert, "certificate file") if args.cert else None,
        )
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        return grpc.secure_channel(args.control, credentials, options=options)
    return grpc.insecure_channel(args.control)


def _call(
    channel: grpc.Channel, method: str, request: Any, response_type: Any, args: argparse.Namespace
) -> Any:
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    stub = channel.unary_unary(
        SERVICE + method,
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    return stub(request, metadata=metadata, timeout=args.timeout)


def _print_json(message: Any) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _print_client(state: control_pb2.ClientState) -> None:
    print(f"client      {state.client_id}")
    print(f"risk        {state.risk:.3f}")
    if state.monitor_risk:
        monitors = ", ".join(f"{name} {risk:.3f}" for name, risk in sorted(state.monitor_risk.items()))
        print(f"monitors    {monitors}")
    if state.queries or state.flags:
        print(f"queries     {state.queries}")
        print(f"flags       {state.flags}")
    if state.first_seen_unix_s or state.last_seen_unix_s:
        print(f"first seen  {_when(state.first_seen_unix_s)}")
        print(f"last seen   {_when(state.last_seen_unix_s)}")


def run(args: argparse.Namespace) -> int:
    pb = control_pb2
    with _channel(args) as channel:
        if args.command == "get-client":
            state = _call(
                channel, "GetClient", pb.GetClientRequest(client_id=args.client_id), pb.ClientState, args
            )
            _print_json(state) if args.json else _print_client(state)
        elif args.command == "list-clients":
            request = pb.ListClientsRequest(limit=args.limit, min_risk=args.min_risk)
            listing = _call(channel, "ListClients", request, pb.ListClientsResponse, args)
            if args.json:
                _print_json(listing)
            elif not listing.clients:
                print("no clients at or above that risk")
            else:
                print(f"{'RISK':>6}  CLIENT")
                for client in listing.clients:
                    print(f"{client.risk:6.3f}  {client.client_id}")
        elif args.command == "reset-client":
            request = pb.ResetClientRequest(client_id=args.client_id)
            reset = _call(channel, "ResetClient", request, pb.ResetClientResponse, args)
            if args.json:
                _print_json(reset)
            else:
                what = "state forgotten" if reset.existed else "had no state"
                print(f"{args.client_id}: {what}")
        elif args.command == "get-policy":
            document = _call(channel, "GetPolicy", pb.GetPolicyRequest(), pb.PolicyDocument, args)
            if args.json:
                _print_json(document)
            else:
                print(f"# sha256 {document.sha256}, loaded {_when(document.loaded_unix_s)}", file=sys.stderr)
                sys.stdout.write(document.yaml if document.yaml.endswith("\n") else document.yaml + "\n")
        elif args.command == "reload-policy":
            text = _read(args.file, "policy file").decode() if args.file else ""
            if args.file and not text:
                raise UsageError(f"policy file {args.file} is empty")
            reloaded = _call(
                channel, "ReloadPolicy", pb.ReloadPolicyRequest(yaml=text), pb.ReloadPolicyResponse, args
            )
            if args.json:
                _print_json(reloaded)
            else:
                print(f"policy reloaded: sha256 {reloaded.policy.sha256}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tfshield admin", description="Query and steer a running tfshield gateway."
    )
    p.add_argument(
        "--control",
        default=os.environ.get(CONTROL_ENV, DEFAULT_CONTROL),
        help=f"control API address, host:port (default ${CONTROL_ENV} or {DEFAULT_CONTROL})",
    )
    p.add_argument("--token-file", help=f"file holding the bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--ca", help="CA certificate (PEM) to verify the gateway: turns TLS on")
    p.add_argument("--cert", help="client certificate (PEM) for mTLS")
    p.add_argument("--key", help="client key (PEM) for mTLS")
    p.add_argument("--server-name", help="name expected in the gateway's certificate, if not the host")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    get = commands.add_parser("get-client", help="a client's risk and the monitor risks behind it")
    get.add_argument("client_id", metavar="ID")
    listing = commands.add_parser("list-clients", help="the riskiest clients, highest first")
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    listing.add_argument("--min-risk", type=float, default=0.0, help="only clients at or above this risk")
    reset = commands.add_parser("reset-client", help="forget a client's monitor state")
    reset.add_argument("client_id", metavar="ID")
    commands.add_parser("get-policy", help="print the policy in force (YAML)")
    reload = commands.add_parser(
        "reload-policy", help="send a new policy, or make the gateway re-read its file"
    )
    reload.add_argument(
        "file", nargs="?", metavar="FILE", help="policy YAML to send (default: the gateway re-reads)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "list-clients" and not (0 <= args.limit <= 1000):
            raise UsageError("--limit must be between 0 and 1000")
        args.token = _token(args)
        return run(args)
    except UsageError as exc:
        print(f"tfshield admin: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "ERROR"
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"cannot reach the control API at {args.control}: {details}"
        print(f"tfshield admin: {name}: {details}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
