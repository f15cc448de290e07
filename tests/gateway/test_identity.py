"""Client ids: first source in the configured order wins; API keys only as hashes."""

from __future__ import annotations

from gateway.config import IdentityConfig
from gateway.identity import ANONYMOUS, ClientIdentifier


class FakeContext:
    """The three accessors identity reads from a grpc.aio.ServicerContext."""

    def __init__(self, peer="ipv4:10.1.2.3:5555", metadata=(), auth=None) -> None:
        self._peer, self._metadata, self._auth = peer, metadata, auth or {}

    def peer(self):
        return self._peer

    def invocation_metadata(self):
        return self._metadata

    def auth_context(self):
        return self._auth


SALT = b"s" * 32


def test_spiffe_uri_wins_over_common_name() -> None:
    ident = ClientIdentifier(IdentityConfig(), SALT)
    auth = {
        "x509_common_name": [b"cn"],
        "x509_subject_alternative_name": [b"dns.example", b"spiffe://td/ns/a"],
    }
    assert ident.identify(FakeContext(auth=auth)) == "mtls:spiffe://td/ns/a"


def test_api_key_is_kept_only_as_a_keyed_hash() -> None:
    ident = ClientIdentifier(IdentityConfig(), SALT)
    client = ident.identify(FakeContext(metadata=(("x-api-key", "secret-key-1"),)))
    assert client.startswith("key:") and "secret-key-1" not in client
    other_salt = ClientIdentifier(IdentityConfig(), b"t" * 32)
    assert other_salt.identify(FakeContext(metadata=(("x-api-key", "secret-key-1"),))) != client


def test_peer_address_drops_the_port() -> None:
    ident = ClientIdentifier(IdentityConfig(order=("peer",)), SALT)
    assert ident.identify(FakeContext()) == "peer:10.1.2.3"
    assert ident.identify(FakeContext(peer="ipv6:[::1]:4000")) == "peer:::1"


def test_no_source_gives_anonymous() -> None:
    ident = ClientIdentifier(IdentityConfig(order=("mtls", "metadata")), SALT)
    assert ident.identify(FakeContext()) == ANONYMOUS
