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


def test_without_verified_client_certificates_the_auth_context_is_never_read() -> None:
    class NoAuth(FakeContext):
        def auth_context(self):
            raise AssertionError("auth_context read on a listener that verifies no client certificate")

    ident = ClientIdentifier(IdentityConfig(), SALT, client_certificates=False)
    assert ident.identify(NoAuth()) == "peer:10.1.2.3"
    assert ident.identify(NoAuth(metadata=(("x-api-key", "k"),))).startswith("key:")
    # Where the listener does verify them, the certificate still comes first.
    auth = {"x509_common_name": [b"cn"]}
    assert ClientIdentifier(IdentityConfig(), SALT).identify(FakeContext(auth=auth)) == "mtls:cn"


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


def test_forwarded_for_is_believed_only_from_a_trusted_proxy() -> None:
    ident = ClientIdentifier(IdentityConfig(order=("peer",), trusted_proxies=("10.1.0.0/16",)), SALT)
    via_proxy = FakeContext(
        peer="ipv4:10.1.2.3:5555", metadata=(("x-forwarded-for", "1.2.3.4, 203.0.113.9"),)
    )
    # The right-most untrusted hop: "1.2.3.4" was written by the client itself.
    assert ident.identify(via_proxy) == "peer:203.0.113.9"
    direct = FakeContext(peer="ipv4:198.51.100.7:5555", metadata=(("x-forwarded-for", "203.0.113.9"),))
    assert ident.identify(direct) == "peer:198.51.100.7"


def test_a_chain_of_trusted_proxies_is_skipped_and_garbage_is_ignored() -> None:
    ident = ClientIdentifier(IdentityConfig(order=("peer",), trusted_proxies=("10.0.0.0/8",)), SALT)
    chain = FakeContext(peer="ipv4:10.0.0.1:1", metadata=(("x-forwarded-for", "203.0.113.5, 10.9.9.9"),))
    assert ident.identify(chain) == "peer:203.0.113.5"
    garbage = FakeContext(peer="ipv4:10.0.0.1:1", metadata=(("x-forwarded-for", "not-an-ip"),))
    assert ident.identify(garbage) == "peer:10.0.0.1"


class MetadataOnceContext(FakeContext):
    """A context whose metadata the caller already read: asking for it again is a mistake."""

    def invocation_metadata(self):
        raise AssertionError("identify read the metadata again instead of using what it was given")


def test_metadata_the_caller_holds_is_used_for_keys_and_forwarded_hops() -> None:
    key = ClientIdentifier(IdentityConfig(order=("metadata", "peer")), SALT)
    held = (("x-api-key", "secret-key-1"),)
    assert key.identify(MetadataOnceContext(), held) == key.identify(FakeContext(metadata=held))
    assert key.identify(MetadataOnceContext(), ()) == "peer:10.1.2.3"
    proxied = ClientIdentifier(IdentityConfig(order=("peer",), trusted_proxies=("10.1.0.0/16",)), SALT)
    hops = (("x-forwarded-for", "203.0.113.9"),)
    assert proxied.identify(MetadataOnceContext(), hops) == "peer:203.0.113.9"
