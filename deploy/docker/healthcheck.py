#!/opt/tfshield/bin/python
"""Ask a tfshield gateway's grpc.health.v1 service whether it is healthy.

Used where the kubelet's own gRPC probe cannot be: Docker's HEALTHCHECK, and
Kubernetes exec probes when the gateway's port speaks TLS (kubelet gRPC probes
are plaintext only).

Two questions, two exit codes (0 = yes, 1 = no):

- readiness (default): is the gateway SERVING? It is only while its upstream
  model server is reachable;
- ``--live``: does the gateway answer at all? SERVING and NOT_SERVING both
  count, so a gateway waiting for a slow model load is not restarted.

Only grpcio and the gateway's own ``protos`` package are used: no TensorFlow,
no grpc_health_probe binary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from protos import health_pb2

CHECK = "/grpc.health.v1.Health/Check"


def channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca).read_bytes(),
        private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
        certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def check(args: argparse.Namespace) -> tuple[bool, str]:
    request = health_pb2.HealthCheckRequest(service=args.service)
    with channel(args) as ch:
        call = ch.unary_unary(
            CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = call(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            return False, f"health check failed: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if args.live:
        return True, f"alive ({status})"
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfshield-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:8500", help="gateway gRPC address, host:port")
    parser.add_argument("--service", default="", help="health service name ('' = the whole gateway)")
    parser.add_argument("--live", action="store_true", help="any answer is healthy (liveness)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    parser.add_argument("--tls-ca", help="PEM CA bundle that signed the gateway's certificate (enables TLS)")
    parser.add_argument("--tls-cert", help="client certificate, when the gateway requires mTLS")
    parser.add_argument("--tls-key", help="client private key, when the gateway requires mTLS")
    parser.add_argument("--server-name", help="name to expect in the gateway's certificate")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    healthy, detail = check(args)
    print(detail, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
