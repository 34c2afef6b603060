"""Key material: one fixed algorithm per key type, RFC 7638 names, the
signing key created once (even by racing processes), and the trust files a
registry reads (PEM bundles with certificates, JWKS documents)."""

from __future__ import annotations

import base64
import datetime
import json
import multiprocessing
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from registry.auth import keys as keys_module
from registry.auth.keys import (KeyFileError, KeySet, jwk_thumbprint, libtrust_key_id, load_or_create_signing_key,
                                load_signing_key, load_verification_keys, parse_jwk, parse_jwks, public_jwk,
                                signing_key, verification_key)

# RFC 7638 §3.1, the example RSA key
RFC7638_N = ("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZC"
             "iFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnY"
             "b9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0L"
             "s1jF44-csFCur-kEgU8awapJzKnqDKgw")
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
# jwt.md, "Signature": the example ECDSA key and its kid
JWT_MD_KEY = {"kty": "EC", "crv": "P-256", "kid": "PYYO:TEWU:V7JH:26JV:AQTZ:LJC3:SXVJ:XGHA:34F2:2LAQ:ZRMK:Z7Q6",
              "d": "R7OnbfMaD5J2jl7GeE8ESo7CnHSBm_1N2k9IXYFrKJA",
              "x": "m7zUpx3b-zmVE5cymSs64POG9QcyEpJaYCD82-549_Q",
              "y": "dU3biz8sZ_8GPB-odm8Wxz3lNDr1xcAQQPQaOcr1fmc"}


def b64u_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def make_certificate(key, *, issuer_key=None, issuer_name: str | None = None, name: str = "token signer",
                     ca: bool = True, not_before: datetime.datetime | None = None,
                     days: int = 30, key_usage: x509.KeyUsage | None = None) -> x509.Certificate:
    """A certificate for `key`'s public half: self-signed unless issuer_key is given."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start = not_before or now - datetime.timedelta(days=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    signer = issuer_key or key
    return builder.sign(signer, None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(65537, 2048)


# ---- names and algorithms -----------------------------------------------------------

def test_rfc7638_thumbprint_of_the_rfc_example():
    """RFC 7638 §3.1: the example RSA key's thumbprint."""
    public_key = rsa.RSAPublicNumbers(b64u_int("AQAB"), b64u_int(RFC7638_N)).public_key()
    assert jwk_thumbprint(public_key) == RFC7638_THUMBPRINT
    assert verification_key(public_key).kid == RFC7638_THUMBPRINT


def test_the_jwt_md_example_kid_is_the_keys_libtrust_id():
    """jwt.md, "Signature": the example key's kid is its libtrust key id, an
    alias that finds the key in a KeySet (tokens from Distribution-era token
    servers name keys this way)."""
    key = parse_jwk({k: v for k, v in JWT_MD_KEY.items() if k not in ("kid", "d")})
    assert libtrust_key_id(key.public_key) == JWT_MD_KEY["kid"]
    key_set = KeySet([key])
    assert key_set.get(JWT_MD_KEY["kid"]) is key_set.get(key.kid) is not None


@pytest.mark.parametrize("make, algorithm", [
    (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
    (lambda: ec.generate_private_key(ec.SECP384R1()), "ES384"),
    (lambda: ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
])
def test_each_key_type_has_one_algorithm_and_its_jwk_round_trips(make, algorithm):
    private = make()
    key = verification_key(private.public_key())
    assert key.algorithm == algorithm
    jwk = public_jwk(private.public_key(), key.kid, key.algorithm)
    assert jwk["use"] == "sig" and jwk["alg"] == algorithm and jwk["kid"] == key.kid
    assert "d" not in jwk
    again = parse_jwk(jwk)
    assert again.fingerprint == key.fingerprint and again.kid == key.kid


def test_rsa_is_rs256_and_ec_coordinates_keep_their_length(rsa_key):
    key = verification_key(rsa_key.public_key())
    assert key.algorithm == "RS256"
    assert set(public_jwk(rsa_key.public_key(), key.kid, key.algorithm)) == {"kty", "n", "e", "kid", "alg", "use"}
    # RFC 7518 §6.2.1.2: a P-256 coordinate is 32 bytes even when its leading byte is zero
    ec_key = next(k for k in (ec.derive_private_key(i, ec.SECP256R1()).public_key() for i in range(1, 10000))
                  if k.public_numbers().x < (1 << 248))
    jwk = public_jwk(ec_key, "k", "ES256")
    assert len(base64.urlsafe_b64decode(jwk["x"] + "==")) == 32
    assert parse_jwk(jwk).fingerprint == verification_key(ec_key).fingerprint


@pytest.mark.parametrize("make", [
    lambda: ec.generate_private_key(ec.SECP521R1()),
    lambda: ed448.Ed448PrivateKey.generate(),
    lambda: rsa.generate_private_key(65537, 1024),
], ids=["P-521", "Ed448", "RSA-1024"])
def test_other_keys_are_refused(make, tmp_path):
    path = tmp_path / "trust.pem"
    path.write_bytes(pem_public(make()))
    with pytest.raises(KeyFileError) as caught:
        load_verification_keys(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message and "BEGIN" not in message


def test_a_1024_bit_rsa_signing_key_is_refused(tmp_path):
    path = tmp_path / "signing.pem"
    small = rsa.generate_private_key(65537, 1024)
    path.write_bytes(small.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    with pytest.raises(KeyFileError, match="1024 bits is too small") as caught:
        load_or_create_signing_key(path)
    assert str(path) in str(caught.value) and "PRIVATE" not in str(caught.value)


# ---- the signing key ----------------------------------------------------------------

def test_created_once_private_and_reused(tmp_path):
    path = tmp_path / "keys" / "token.pem"
    first = load_or_create_signing_key(path)
    assert first.algorithm == "ES256"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    second = load_or_create_signing_key(path)
    assert second.kid == first.kid
    assert os.listdir(path.parent) == ["token.pem"]          # no temporary file left


@pytest.mark.parametrize("algorithm, kind", [("EdDSA", ed25519.Ed25519PrivateKey), ("RS256", rsa.RSAPrivateKey)])
def test_created_with_the_algorithm_asked_for(tmp_path, algorithm, kind):
    key = load_or_create_signing_key(tmp_path / "k.pem", algorithm)
    assert key.algorithm == algorithm and isinstance(key.private_key, kind)
    if kind is rsa.RSAPrivateKey:
        assert key.private_key.key_size == 3072


def test_an_existing_key_keeps_its_own_type(tmp_path, rsa_key):
    """Traditional ("BEGIN RSA PRIVATE KEY") PEM is read as well as PKCS8."""
    path = tmp_path / "k.pem"
    path.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key = load_or_create_signing_key(path, "ES256")
    assert key.algorithm == "RS256" and key.kid == verification_key(rsa_key.public_key()).kid


@pytest.mark.parametrize("content, problem", [
    (b"not a key", "not a PEM private key"),
    (ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")), "encrypted"),
])
def test_unusable_signing_key_files(tmp_path, content, problem):
    path = tmp_path / "k.pem"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=problem):
        load_signing_key(path)


def test_the_loser_of_a_race_uses_the_winners_key(tmp_path, monkeypatch):
    """Another process links its key first: ours is discarded (with its
    temporary file) and the winner's returned."""
    path = tmp_path / "token.pem"
    winner = ec.generate_private_key(ec.SECP256R1())
    real_link = os.link

    def link_after_winner(src, dst):
        with open(dst, "xb") as out:
            out.write(winner.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        real_link(src, dst)

    monkeypatch.setattr(keys_module.os, "link", link_after_winner)
    key = load_or_create_signing_key(path)
    assert key.kid == verification_key(winner.public_key()).kid
    assert os.listdir(tmp_path) == ["token.pem"]


def _race(path, barrier, results):
    barrier.wait()
    results.put(load_or_create_signing_key(path).kid)


def test_racing_processes_end_with_one_key(tmp_path):
    context = multiprocessing.get_context("fork")
    path = tmp_path / "state" / "token.pem"
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_race, args=(path, barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    kids = [results.get(timeout=20) for _ in workers]
    for worker in workers:
        worker.join(timeout=20)
        assert worker.exitcode == 0
    assert len(set(kids)) == 1 and kids[0] == load_signing_key(path).kid
    assert os.listdir(path.parent) == ["token.pem"]


# ---- trust files --------------------------------------------------------------------

def test_a_pem_bundle_of_keys_and_certificates(tmp_path, rsa_key):
    """Like Distribution's `rootcertbundle`: certificates (kept, to check x5c
    chains against) and bare public keys in one file."""
    ec_key, ed_key = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    cert = make_certificate(rsa_key)
    path = tmp_path / "bundle.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + pem_public(ec_key)
                     + make_certificate(ed_key).public_bytes(serialization.Encoding.PEM))
    loaded = load_verification_keys(path)
    assert [k.algorithm for k in loaded] == ["RS256", "ES256", "EdDSA"]
    assert loaded[0].certificate == cert and loaded[1].certificate is None
    key_set = KeySet(loaded)
    assert len(key_set) == 3 and cert in key_set.certificates and len(key_set.certificates) == 2
    assert key_set.by_material(ec_key.public_key()).kid == jwk_thumbprint(ec_key.public_key())


def test_a_jwks_file_keys_by_thumbprint_with_its_kid_as_an_alias(tmp_path, rsa_key):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_jwk = {**public_jwk(ec_key.public_key(), "issuer-key-1", "ES256"), "d": "ignored-private-member"}
    enc = {**public_jwk(rsa_key.public_key(), "enc-1", "RS256"), "use": "enc", "alg": "RSA-OAEP"}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [ec_jwk, enc]}))
    loaded = load_verification_keys(path)
    assert len(loaded) == 1                       # the encryption key is skipped
    key_set = KeySet(loaded)
    thumbprint = jwk_thumbprint(ec_key.public_key())
    assert key_set.get(thumbprint) is key_set.get("issuer-key-1") is not None
    assert key_set.get(thumbprint).kid == thumbprint
    # the published JWKS names keys by thumbprint and round-trips
    assert [k["kid"] for k in key_set.jwks()["keys"]] == [thumbprint]
    assert parse_jwks(key_set.jwks())[0].fingerprint == loaded[0].fingerprint


@pytest.mark.parametrize("document, problem", [
    ([], "not a JWKS document"),
    ({"keys": []}, "no signature keys"),
    ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "not supported"),
    ({"keys": [{"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}]}, "not a valid public key"),
])
def test_unusable_jwks_documents(tmp_path, document, problem):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(document))
    with pytest.raises(KeyFileError, match=problem):
        load_verification_keys(path)


def test_a_jwks_kid_naming_two_keys_is_refused():
    one, two = (ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(2))
    with pytest.raises(KeyFileError, match="names two different keys"):
        parse_jwks({"keys": [public_jwk(one, "same", "ES256"), public_jwk(two, "same", "ES256")]})


def test_a_jwk_declaring_another_algorithm_is_refused(rsa_key):
    jwk = public_jwk(rsa_key.public_key(), "k", "PS256")
    with pytest.raises(KeyFileError, match="signs with RS256"):
        parse_jwk(jwk)


@pytest.mark.parametrize("content, problem", [
    (b"", "holds no PEM public key"),
    (ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
     "is a private key"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid certificate"),
    (b"{not json", "not valid JSON"),
])
def test_unusable_trust_files(tmp_path, content, problem):
    path = tmp_path / "trust"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=problem) as caught:
        load_verification_keys(path)
    assert "\n" not in str(caught.value) and "PRIVATE KEY-----" not in str(caught.value)


def test_a_missing_trust_file_names_itself(tmp_path):
    with pytest.raises(KeyFileError, match="missing.pem: cannot read"):
        load_verification_keys(tmp_path / "missing.pem")


def test_key_set_merges_one_material_and_refuses_an_ambiguous_name(rsa_key):
    cert = make_certificate(rsa_key)
    from_cert = verification_key(rsa_key.public_key(), certificate=cert)
    from_jwks = verification_key(rsa_key.public_key(), aliases=["legacy"])
    merged = KeySet([from_jwks, from_cert])
    assert len(merged) == 1 and merged.get("legacy").certificate == cert
    other = verification_key(ec.generate_private_key(ec.SECP256R1()).public_key(), aliases=["legacy"])
    with pytest.raises(ValueError, match="names two different keys"):
        KeySet([from_jwks, other])


def test_signing_key_repr_holds_no_private_material():
    key = signing_key(ec.generate_private_key(ec.SECP256R1()))
    assert "private_key" not in repr(key)
