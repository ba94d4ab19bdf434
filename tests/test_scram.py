"""SCRAM client (bosh_middleware.scram): RFC 5802 / RFC 7677 test vectors, the checks that
protect against a lying or hostile server, the salted-password cache and SASLprep (RFC 4013)."""

from __future__ import annotations

import base64
import hashlib
import sys

import pytest

from bosh_middleware import scram
from bosh_middleware.errors import AuthenticationFailed, ProtocolError
from bosh_middleware.scram import MAX_ITERATIONS, MIN_ITERATIONS, ScramClient, clear_cache, saslprep

# RFC 5802 section 5 (SCRAM-SHA-1) and RFC 7677 section 3 (SCRAM-SHA-256), user "user",
# password "pencil".
VECTORS = {
    "SCRAM-SHA-1": {
        "nonce": "fyko+d2lbbFgONRv9qkxdawL",
        "client_first": b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
        "server_first": b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
        "client_final": (
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
        ),
        "server_final": b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
    },
    "SCRAM-SHA-256": {
        "nonce": "rOprNGfwEbeRWgbNEkqO",
        "client_first": b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
        "server_first": (
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        ),
        "client_final": (
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        ),
        "server_final": b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
    },
}


@pytest.fixture(autouse=True)
def _empty_cache():
    clear_cache()
    yield
    clear_cache()


def _client(mech: str, password: str = "pencil", user: str = "user") -> ScramClient:
    return ScramClient(mech, user, password, nonce=VECTORS[mech]["nonce"])


@pytest.fixture(params=["cryptography", "hashlib"])
def pbkdf2_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each PBKDF2 backend in turn (the test extras install cryptography)."""
    derive = scram._cryptography_pbkdf2() if request.param == "cryptography" else None
    monkeypatch.setattr(scram, "_pbkdf2", derive or scram._hashlib_pbkdf2)
    assert scram.pbkdf2_backend() == request.param
    return str(request.param)


@pytest.mark.parametrize("mech", sorted(VECTORS))
def test_rfc_vectors(mech: str, pbkdf2_backend: str) -> None:
    v = VECTORS[mech]
    c = _client(mech)
    assert c.client_first() == v["client_first"]
    assert c.client_final(v["server_first"]) == v["client_final"]
    c.verify_server_final(v["server_final"])  # does not raise


@pytest.mark.parametrize("mech", sorted(VECTORS))
def test_wrong_server_signature_is_refused(mech: str) -> None:
    v = VECTORS[mech]
    c = _client(mech)
    c.client_final(v["server_first"])
    good = base64.b64decode(v["server_final"][2:])
    forged = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(ProtocolError) as info:
        c.verify_server_final(b"v=" + base64.b64encode(forged))
    assert info.value.condition == "server-signature-mismatch"
    # a missing or undecodable verifier is just as wrong
    for bad in (b"v=", b"v=!!notbase64!!", b"x=1"):
        with pytest.raises(ProtocolError) as info:
            c.verify_server_final(bad)
        assert info.value.condition == "server-signature-mismatch"


@pytest.mark.parametrize("server_final", [b"", b"garbage", b"v", b"\xff\xfe=1"])
def test_a_malformed_server_final_is_a_wrong_signature(server_final: bytes) -> None:
    """Not a signature at all (an empty ``<success/>``, no ``k=v`` pairs, not UTF-8) is as
    wrong as a forged one, with the same condition: the flow must not take it for anything
    a second login could mend."""
    v = VECTORS["SCRAM-SHA-1"]
    c = _client("SCRAM-SHA-1")
    c.client_final(v["server_first"])
    with pytest.raises(ProtocolError) as info:
        c.verify_server_final(server_final)
    assert info.value.condition == "server-signature-mismatch"


def test_server_final_before_client_final_is_refused() -> None:
    c = _client("SCRAM-SHA-1")
    with pytest.raises(ProtocolError):
        c.verify_server_final(VECTORS["SCRAM-SHA-1"]["server_final"])


def test_server_error_attribute_raises_authentication_failed() -> None:
    v = VECTORS["SCRAM-SHA-256"]
    c = _client("SCRAM-SHA-256")
    c.client_final(v["server_first"])
    with pytest.raises(AuthenticationFailed) as info:
        c.verify_server_final(b"e=invalid-proof")
    assert info.value.condition == "invalid-proof"
    assert not isinstance(info.value, ProtocolError)


@pytest.mark.parametrize(
    "server_first",
    [
        # a nonce unrelated to ours
        b"r=AAAAAAAAAAAAAAAAAAAAAAAAserver,s=QSXCR+Q6sek8bf92,i=4096",
        # exactly our nonce: the server added nothing
        b"r=fyko+d2lbbFgONRv9qkxdawL,s=QSXCR+Q6sek8bf92,i=4096",
        # ours with a prefix instead of a suffix
        b"r=Xfyko+d2lbbFgONRv9qkxdawL,s=QSXCR+Q6sek8bf92,i=4096",
    ],
)
def test_server_nonce_must_extend_client_nonce(server_first: bytes) -> None:
    with pytest.raises(ProtocolError, match="nonce"):
        _client("SCRAM-SHA-1").client_final(server_first)


def test_iteration_count_bounds(pbkdf2_calls: list) -> None:
    nonce = VECTORS["SCRAM-SHA-1"]["nonce"]
    for count in (MAX_ITERATIONS + 1, 10**9, MIN_ITERATIONS - 1, 1, 0, -1):
        sf = f"r={nonce}srv,s=QSXCR+Q6sek8bf92,i={count}".encode()
        with pytest.raises(ProtocolError, match="iteration"):
            _client("SCRAM-SHA-1").client_final(sf)
    assert pbkdf2_calls == []  # refused before any key derivation
    # the bound itself is accepted
    sf = f"r={nonce}srv,s=QSXCR+Q6sek8bf92,i={MAX_ITERATIONS}".encode()
    assert _client("SCRAM-SHA-1").client_final(sf).startswith(b"c=biws,")
    assert [c[2] for c in pbkdf2_calls] == [MAX_ITERATIONS]


def test_an_empty_salt_is_refused(pbkdf2_calls: list) -> None:
    """With no salt the derived keys could be precomputed for common passwords."""
    nonce = VECTORS["SCRAM-SHA-1"]["nonce"]
    with pytest.raises(ProtocolError, match="salt"):
        _client("SCRAM-SHA-1").client_final(f"r={nonce}srv,s=,i=4096".encode())
    assert pbkdf2_calls == []


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=fyko+d2lbbFgONRv9qkxdawLsrv,i=4096",  # no salt
        b"r=fyko+d2lbbFgONRv9qkxdawLsrv,s=QSXCR+Q6sek8bf92",  # no count
        b"r=fyko+d2lbbFgONRv9qkxdawLsrv,s=QSXCR+Q6sek8bf92,i=many",
        b"r=fyko+d2lbbFgONRv9qkxdawLsrv,s=not base64!,i=4096",
        b"m=ext,r=fyko+d2lbbFgONRv9qkxdawLsrv,s=QSXCR+Q6sek8bf92,i=4096",
        b"garbage",
        b"\xff\xfe",
    ],
)
def test_malformed_server_first(server_first: bytes) -> None:
    with pytest.raises(ProtocolError):
        _client("SCRAM-SHA-1").client_final(server_first)


def test_derivations_count_what_the_cache_did_not_spare() -> None:
    before = scram.derivations()
    v = VECTORS["SCRAM-SHA-1"]
    for _ in range(3):
        _client("SCRAM-SHA-1").client_final(v["server_first"])
    assert scram.derivations() - before == 1
    clear_cache()
    _client("SCRAM-SHA-1").client_final(v["server_first"])
    assert scram.derivations() - before == 2


def test_salted_password_cache(pbkdf2_calls: list) -> None:
    v = VECTORS["SCRAM-SHA-1"]
    first = _client("SCRAM-SHA-1")
    assert first.client_final(v["server_first"]) == v["client_final"]
    assert len(pbkdf2_calls) == 1

    # same (user, password, salt, iterations): no PBKDF2, and still the right proof
    second = _client("SCRAM-SHA-1")
    assert second.client_final(v["server_first"]) == v["client_final"]
    second.verify_server_final(v["server_final"])
    assert len(pbkdf2_calls) == 1

    # a changed password must miss the cache (and give a different, wrong-for-the-RFC proof)
    changed = _client("SCRAM-SHA-1", password="pencil2")
    assert changed.client_final(v["server_first"]) != v["client_final"]
    assert len(pbkdf2_calls) == 2
    with pytest.raises(ProtocolError):
        changed.verify_server_final(v["server_final"])

    # a different salt or iteration count misses too
    nonce = v["nonce"]
    _client("SCRAM-SHA-1").client_final(f"r={nonce}x,s=c2FsdA==,i=4096".encode())
    _client("SCRAM-SHA-1").client_final(f"r={nonce}x,s=QSXCR+Q6sek8bf92,i=4097".encode())
    assert len(pbkdf2_calls) == 4
    # another hash with the same salt is another key
    nonce256 = VECTORS["SCRAM-SHA-256"]["nonce"]
    _client("SCRAM-SHA-256").client_final(f"r={nonce256}x,s=QSXCR+Q6sek8bf92,i=4096".encode())
    assert [c[0] for c in pbkdf2_calls] == ["sha1", "sha1", "sha1", "sha1", "sha256"]

    clear_cache()
    _client("SCRAM-SHA-1").client_final(v["server_first"])
    assert len(pbkdf2_calls) == 6


def test_username_escaping_and_unknown_mechanism() -> None:
    c = ScramClient("SCRAM-SHA-1", "a=b,c", "pw", nonce="N")
    assert c.client_first() == b"n,,n=a=3Db=2Cc,r=N"
    with pytest.raises(ValueError):
        ScramClient("SCRAM-MD5", "user", "pencil")
    # the password never shows in a repr
    assert "pencil" not in repr(ScramClient("SCRAM-SHA-1", "user", "pencil"))


@pytest.mark.parametrize(
    ("raw", "prepared"),
    [
        ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
        ("user", "user"),
        ("USER", "USER"),  # case preserved
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space -> space
    ],
)
def test_saslprep_rfc4013_examples(raw: str, prepared: str) -> None:
    assert saslprep(raw) == prepared


@pytest.mark.parametrize(
    "raw",
    [
        "\u0007",  # prohibited (control)
        "\u0627\u0031",  # RFC 4013 example: RTL string must end with an RTL character
        "\u0627a\u0627",  # RTL mixed with LTR
        "a\ue000b",  # private use
    ],
)
def test_saslprep_rejects(raw: str) -> None:
    with pytest.raises(ValueError):
        saslprep(raw)


def test_saslprep_applies_to_the_exchange() -> None:
    # "I\u00adX" and "IX" are the same SASL password: same proof
    v = VECTORS["SCRAM-SHA-1"]
    a = ScramClient("SCRAM-SHA-1", "user", "penc\u00adil", nonce=v["nonce"])
    assert a.client_final(v["server_first"]) == v["client_final"]
    with pytest.raises(ValueError):
        ScramClient("SCRAM-SHA-1", "user", "bad\u0007pw")


# --- the PBKDF2 backend ----------------------------------------------------------------------


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
def test_backends_agree_with_hashlib(hash_name: str, pbkdf2_backend: str) -> None:
    for password, salt, iterations in [
        (b"pencil", b"salt", 4096),
        (b"\xc3\xa9" * 40, b"s" * 64, 1),
    ]:
        assert scram.salted_password(hash_name, password, salt, iterations) == hashlib.pbkdf2_hmac(
            hash_name, password, salt, iterations
        )


def test_cryptography_is_preferred_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scram, "_pbkdf2", None)  # as on first use
    assert scram.pbkdf2_backend() == "cryptography"
    assert scram._pbkdf2 is not scram._hashlib_pbkdf2


def test_without_cryptography_hashlib_derives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.kdf.pbkdf2", None)
    monkeypatch.setattr(scram, "_pbkdf2", None)
    assert scram.pbkdf2_backend() == "hashlib"
    c = _client("SCRAM-SHA-256")
    c.client_first()
    assert (
        c.client_final(VECTORS["SCRAM-SHA-256"]["server_first"])
        == (VECTORS["SCRAM-SHA-256"]["client_final"])
    )


def test_a_cryptography_that_derives_wrongly_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    monkeypatch.setattr(PBKDF2HMAC, "derive", lambda self, key: b"\0" * 32)
    assert scram._cryptography_pbkdf2() is None
    monkeypatch.setattr(scram, "_pbkdf2", None)
    assert scram.pbkdf2_backend() == "hashlib"


def test_a_hash_cryptography_refuses_is_derived_by_hashlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """(A FIPS build refuses SHA-1 in PBKDF2; hashlib then decides, as it would alone.)"""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes

    derive = scram._cryptography_pbkdf2()
    assert derive is not None

    class Refused(hashes.SHA1):
        def __init__(self) -> None:
            raise UnsupportedAlgorithm("sha1 is not allowed here")

    monkeypatch.setattr(hashes, "SHA1", Refused)
    derive = scram._cryptography_pbkdf2()  # (the self-check takes hashlib's answer too)
    assert derive is not None
    assert derive("sha1", b"pencil", b"salt", 4096) == hashlib.pbkdf2_hmac(
        "sha1", b"pencil", b"salt", 4096
    )
