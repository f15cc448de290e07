"""The identity stage: who is calling.

A client id is taken from the first source in the configured order that has
one:

- ``mtls``: the verified peer certificate, its SPIFFE URI SAN if present,
  else its subject common name -> ``mtls:<name>``;
- ``metadata``: an API key in the configured metadata key, kept only as a
  keyed hash (HMAC-SHA256 with a secret salt) -> ``key:<16 hex digits>``, so the
  key itself is never stored or logged;
- ``peer``: the peer's IP address without the port -> ``peer:<address>``;
  when the peer is a configured trusted proxy, the client's address from the
  forwarded-for metadata instead (the right-most address that is not itself a
  trusted proxy: entries further left were written by the client and prove
  nothing).

With none of them the id is ``anonymous``; ``identity.anonymous: refuse``
refuses such calls with UNAUTHENTICATED instead.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
from collections.abc import Sequence

import grpc

from gateway.config import IdentityConfig

log = logging.getLogger(__name__)
ANONYMOUS = "anonymous"


def _peer_address(peer: str) -> str:
    # grpc peers look like "ipv4:127.0.0.1:5123", "ipv6:[::1]:5123" or "unix:/path".
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.index("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return rest or peer


class ClientIdentifier:
    """Client ids from the sources ``config.order`` lists.

    ``client_certificates=False`` says the listener verifies none (no TLS, or
    TLS without a client CA): the ``mtls`` source can then never answer, and
    is skipped rather than asked on every call (reading the auth context costs
    several µs per call).
    """

    def __init__(
        self, config: IdentityConfig, salt: bytes | None = None, *, client_certificates: bool = True
    ) -> None:
        self._order = tuple(s for s in config.order if client_certificates or s != "mtls")
        self._proxies = tuple(ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies)
        self._forwarded_key = config.forwarded_for_key.lower()
        self.refuse_anonymous = config.anonymous == "refuse"
        self._metadata_key = config.metadata_key.lower()
        self._salt_env = config.hash_salt_env
        self._warn_random_salt = False
        if salt is None:
            env_salt = os.environ.get(config.hash_salt_env, "")
            self._warn_random_salt = not env_salt
            salt = env_salt.encode() if env_salt else secrets.token_bytes(32)
        self._salt = salt

    @property
    def salt(self) -> bytes:
        """The secret that keys client-id hashes (the audit log hashes client ids with it too)."""
        return self._salt

    def hash_key(self, api_key: str | bytes) -> str:
        if self._warn_random_salt:
            self._warn_random_salt = False
            log.warning(
                "%s is not set: API keys are hashed with a random per-process salt, so replicas "
                "will not agree on client ids; set it to a shared secret",
                self._salt_env,
            )
        key = api_key.encode() if isinstance(api_key, str) else api_key
        return hmac.new(self._salt, key, hashlib.sha256).hexdigest()[:16]

    def identify(
        self, context: grpc.aio.ServicerContext, metadata: Sequence[tuple[str, str | bytes]] | None = None
    ) -> str:
        """The call's client id. ``metadata``: the call's invocation metadata, when the caller
        already holds it (each ``context.invocation_metadata()`` builds it anew)."""
        if metadata is None:
            metadata = context.invocation_metadata() or ()
        for source in self._order:
            if source == "mtls":
                auth = context.auth_context()
                for uri in auth.get("x509_subject_alternative_name", ()):
                    if uri.startswith(b"spiffe://"):
                        return "mtls:" + uri.decode("utf-8", "replace")
                names = auth.get("x509_common_name")
                if names:
                    return "mtls:" + names[0].decode("utf-8", "replace")
            elif source == "metadata":
                for key, value in metadata:
                    if key == self._metadata_key and value:
                        return "key:" + self.hash_key(value)
            elif source == "peer":
                peer = context.peer()
                if peer:
                    address = _peer_address(peer)
                    if self._proxies and self._trusted(address):
                        address = self._forwarded_client(metadata) or address
                    return "peer:" + address
        return ANONYMOUS

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._proxies)

    def _forwarded_client(self, metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        hops: list[str] = []
        for key, value in metadata:
            if key == self._forwarded_key:
                text = value if isinstance(value, str) else value.decode("latin-1")
                hops += [h.strip() for h in text.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return None  # garbage in the header: fall back to the proxy's own address
        return None
