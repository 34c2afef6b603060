"""Access and refresh tokens: what the token service signs and every check
the registry makes before it trusts one (docker-registry/jwt.md, "Verifying
the token"). Each refusal below fails if its check is taken away; the clock
is a fake one, so times are exact."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from registry.auth.keys import (KeySet, SigningKey, generate_signing_key, load_verification_keys, parse_jwk,
                                public_jwk, signing_key, verification_key)
from registry.auth.scopes import CATALOG_SCOPE, repository_scope
from registry.auth.tokens import (BadSignature, ExpiredToken, InvalidClaims, MalformedToken, TokenError,
                                  TokenIssuer, TokenVerifier, UntrustedKey)
from tests.registry.auth.test_keys import JWT_MD_KEY, b64u_int, make_certificate

ISSUER, SERVICE = "auth.example.com", "registry.example.com"
MAX_LIFETIME, LEEWAY = 600, 30
DROP = object()


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))    # near real time, so certificates made now are valid

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def es_key() -> SigningKey:
    return generate_signing_key("ES256")


@pytest.fixture(scope="module")
def rs_key() -> SigningKey:
    return signing_key(rsa.generate_private_key(65537, 2048))    # 3072 is slower to make


@pytest.fixture(scope="module")
def ed_key() -> SigningKey:
    return generate_signing_key("EdDSA")


@pytest.fixture(scope="module")
def attacker() -> SigningKey:
    return generate_signing_key("ES256")


def verifier_for(clock, *keys: SigningKey, **options) -> TokenVerifier:
    return TokenVerifier(KeySet([k.verification for k in keys]), issuer=ISSUER, service=SERVICE,
                         max_lifetime=MAX_LIFETIME, leeway=LEEWAY, clock=clock, **options)


def issuer_for(clock, key: SigningKey, lifetime: int = 300) -> TokenIssuer:
    return TokenIssuer(key, issuer=ISSUER, service=SERVICE, lifetime=lifetime, refresh_lifetime=86400,
                       clock=clock)


def claims(clock, **changes) -> dict:
    now = int(clock())
    body = {"iss": ISSUER, "sub": "alice", "aud": SERVICE, "exp": now + 300, "nbf": now, "iat": now,
            "jti": "0123456789abcdef", "access": [{"type": "repository", "name": "team/app", "actions": ["pull"]}]}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not DROP}


def sign(key: SigningKey, body: dict, *, alg: str | None = None, **header) -> str:
    """Any claim set, even one jwt.encode would refuse to make."""
    headers = {k: v for k, v in {"typ": "JWT", "kid": key.kid, **header}.items() if v is not None}
    return jwt.api_jws.encode(json.dumps(body).encode(), key.private_key, algorithm=alg or key.algorithm,
                              headers=headers)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict, body: dict) -> str:
    """The signing input of a token put together by hand."""
    return f"{b64u(json.dumps(header).encode())}.{b64u(json.dumps(body).encode())}"


# ---- round trips --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["es_key", "rs_key", "ed_key"])
def test_issue_then_verify(request, clock, name):
    """jwt.md, "Headers" and "Claim Set": alg, typ JWT and kid; iss, sub,
    aud, exp, nbf, iat, jti and access; token.md: expires_in and issued_at."""
    key = request.getfixturevalue(name)
    issued = issuer_for(clock, key).issue("alice", [repository_scope("team/app", "pull", "push"), CATALOG_SCOPE])
    assert issued.expires_in == 300
    assert issued.issued_at == datetime.datetime.fromtimestamp(clock(), datetime.timezone.utc)
    header = jwt.get_unverified_header(issued.token)
    assert header == {"alg": key.algorithm, "typ": "JWT", "kid": key.kid}
    body = jwt.decode(issued.token, options={"verify_signature": False})
    now = int(clock())
    assert body["iss"] == ISSUER and body["sub"] == "alice" and body["aud"] == SERVICE
    assert (body["iat"], body["nbf"], body["exp"]) == (now, now, now + 300)
    assert len(bytes.fromhex(body["jti"])) == 16
    assert body["access"][0] == {"type": "repository", "name": "team/app", "actions": ["pull", "push"]}

    token = verifier_for(clock, key).verify(issued.token)
    assert token.subject == "alice" and token.expires_at == now + 300 and token.issued_at == now
    assert token.jti == body["jti"]
    assert token.allows("repository", "team/app", "push") and not token.allows("repository", "team/app", "delete")
    assert not token.allows("repository", "team/other", "pull")
    assert token.allows("registry", "catalog", "*") and token.allows("registry", "catalog", "anything")
    assert token.actions_for("repository", "team/app") == {"pull", "push"}
    assert token.actions_for("repository", "nothing") == frozenset()


def test_an_anonymous_token_has_an_empty_subject_and_lives_at_least_a_minute(clock, es_key):
    """jwt.md: sub is "" when the client did not authenticate; token.md
    "Token Response Fields": never less than 60 seconds to live."""
    issued = issuer_for(clock, es_key, lifetime=5).issue("", [])
    assert issued.expires_in == 60
    token = verifier_for(clock, es_key).verify(issued.token)
    assert token.subject == "" and token.scopes == () and token.expires_at == clock() + 60


def test_a_resource_class_is_ignored(clock, es_key):
    """scope.md, "Resource Class": repository(plugin) is repository."""
    body = claims(clock, access=[{"type": "repository(plugin)", "name": "p/x", "actions": ["pull"]}])
    assert verifier_for(clock, es_key).verify(sign(es_key, body)).allows("repository", "p/x", "pull")


def test_the_spec_example_key_signs_under_its_libtrust_kid(clock):
    """jwt.md, "Signature": a token signed with the example key, naming it
    by the kid shown there, verifies against that public key."""
    public = parse_jwk({k: v for k, v in JWT_MD_KEY.items() if k not in ("kid", "d")})
    private = ec.derive_private_key(b64u_int(JWT_MD_KEY["d"]), ec.SECP256R1())
    assert private.public_key().public_numbers() == public.public_key.public_numbers()
    token = jwt.encode(claims(clock), private, algorithm="ES256", headers={"kid": JWT_MD_KEY["kid"]})
    verifier = TokenVerifier(KeySet([public]), issuer=ISSUER, service=SERVICE, max_lifetime=MAX_LIFETIME,
                             clock=clock)
    assert verifier.verify(token).subject == "alice"


def test_a_distribution_style_token_with_x5c_and_no_kid(tmp_path):
    """jwt.md, "Verifying the token": a token server that sends its
    certificate in x5c (as for Distribution's rootcertbundle) is trusted
    through the bundle."""
    from tests.support.tokens import TokenIssuer as PeerIssuer

    peer = PeerIssuer(tmp_path, service=SERVICE, issuer=ISSUER)
    verifier = TokenVerifier(KeySet(load_verification_keys(peer.bundle)), issuer=ISSUER, service=SERVICE,
                             max_lifetime=MAX_LIFETIME)
    token = peer.issue("bob", [{"type": "repository", "name": "a/b", "actions": ["push"]}])
    assert verifier.verify(token).allows("repository", "a/b", "push")


# ---- the compact form and the algorithm ---------------------------------------------

def _header_part(header: dict) -> str:
    return b64u(json.dumps(header).encode())


GARBAGE = {
    "empty": lambda good: "",
    "one part": lambda good: "abc",
    "two parts": lambda good: good.rsplit(".", 1)[0],
    "four parts": lambda good: good + ".AAAA",
    "padding": lambda good: good + "==",
    "not base64url": lambda good: good.replace(".", ".!", 1),
    "empty payload": lambda good: "{0}..{2}".format(*good.split(".")),
    "not a string": lambda good: good.encode(),
    "header a list": lambda good: "{}.{}.{}".format(b64u(b"[1]"), *good.split(".")[1:]),
    "header not json": lambda good: "{}.{}.{}".format(b64u(b"{nope"), *good.split(".")[1:]),
    "critical extension": lambda good: "{}.{}.{}".format(
        _header_part({**jwt.get_unverified_header(good), "crit": ["exp"]}), *good.split(".")[1:]),
}


@pytest.mark.parametrize("make", GARBAGE.values(), ids=GARBAGE.keys())
def test_not_a_compact_jws_is_refused_before_any_signature_check(clock, es_key, signature_checks, make):
    """RFC 7515 §7.1 (jwt.md, "Signature"): three base64url parts, the header
    a JSON object; no critical extension is understood. Refused cheaply."""
    token = make(sign(es_key, claims(clock)))
    with pytest.raises(MalformedToken):
        verifier_for(clock, es_key).verify(token)
    assert signature_checks == []


def test_alg_none_is_refused(clock, es_key):
    """jwt.md, "Headers": alg names how it was signed, never "none"."""
    unsigned = craft({"alg": "none", "typ": "JWT", "kid": es_key.kid}, claims(clock))
    verifier = verifier_for(clock, es_key)
    for token in (unsigned + ".", unsigned + ".AAAA"):
        with pytest.raises(TokenError):
            verifier.verify(token)


def test_hs256_keyed_with_the_public_key_pem_is_refused(clock, rs_key):
    """The key-confusion attack: an HMAC whose secret is the trusted public
    key's PEM, which a verifier that let the token pick the algorithm accepts."""
    pem = rs_key.private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = craft({"alg": "HS256", "typ": "JWT", "kid": rs_key.kid}, claims(clock))
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{b64u(mac)}"
    with pytest.raises(UntrustedKey, match="algorithm"):
        verifier_for(clock, rs_key).verify(forged)


def test_another_algorithm_for_the_same_key_is_refused(clock, rs_key):
    """An RSA key verifies RS256 only; a PS256 token signed by it is refused."""
    token = sign(rs_key, claims(clock), alg="PS256")
    with pytest.raises(UntrustedKey, match="algorithm"):
        verifier_for(clock, rs_key).verify(token)


# ---- which key ----------------------------------------------------------------------

def test_an_unknown_kid_is_refused(clock, es_key, attacker):
    """jwt.md, "Verifying the token": the kid must be a known key."""
    verifier = verifier_for(clock, es_key, cache_size=0)
    with pytest.raises(UntrustedKey, match="unknown key"):
        verifier.verify(sign(es_key, claims(clock), kid="some-other-key"))
    with pytest.raises(UntrustedKey, match="unknown key"):
        verifier.verify(sign(attacker, claims(clock)))


def test_an_embedded_jwk_must_be_trusted_material(clock, es_key, attacker):
    """jwt.md, "Verifying the token": a jwk header must be a known key; a
    trusted key embedded without a kid is found by its material."""
    verifier = verifier_for(clock, es_key)
    own = public_jwk(attacker.private_key.public_key(), "x", "ES256")
    with pytest.raises(UntrustedKey, match="not a trusted key"):
        verifier.verify(sign(attacker, claims(clock), kid=None, jwk=own))
    mine = public_jwk(es_key.private_key.public_key(), "whatever", "ES256")
    assert verifier.verify(sign(es_key, claims(clock), kid=None, jwk=mine)).subject == "alice"


def test_a_known_kid_does_not_vouch_for_another_embedded_key(clock, es_key, rs_key):
    """CVE-2025-24976 (CNCF Distribution): a known kid beside an embedded jwk
    of other material. Refused when the key is chosen, before any signature."""
    verifier = verifier_for(clock, es_key, rs_key, cache_size=0)
    other = public_jwk(rs_key.private_key.public_key(), rs_key.kid, "RS256")
    with pytest.raises(UntrustedKey, match="disagree"):
        verifier.verify(sign(rs_key, claims(clock), kid=es_key.kid, jwk=other))
    same = public_jwk(es_key.private_key.public_key(), es_key.kid, "ES256")
    assert verifier.verify(sign(es_key, claims(clock), jwk=same)).subject == "alice"


def test_no_kid_and_no_embedded_key_needs_exactly_one_trusted_key(clock, es_key, rs_key):
    """jwt.md, "Headers": a token "should have at least one of" kid, jwk,
    x5c; one that has none can only mean the one key there is."""
    token = sign(es_key, claims(clock), kid=None)
    assert verifier_for(clock, es_key).verify(token).subject == "alice"
    with pytest.raises(UntrustedKey, match="names no key"):
        verifier_for(clock, es_key, rs_key).verify(token)


@pytest.fixture(scope="module")
def authority():
    """A CA certificate a bundle trusts, and a leaf it issued for signing."""
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = make_certificate(ca_key, name="token CA")
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    leaf_cert = make_certificate(leaf_key, issuer_key=ca_key, issuer_name="token CA", name="signer", ca=False,
                                 key_usage=usage)
    return ca_key, ca_cert, leaf_key, leaf_cert


def x5c_of(cert: x509.Certificate) -> list[str]:
    return [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]


def test_an_x5c_leaf_issued_by_a_trusted_certificate(clock, authority):
    """jwt.md, "Verifying the token": the x5c chain must be valid — its leaf
    issued by a certificate of the bundle, and valid now."""
    ca_key, ca_cert, leaf_key, leaf_cert = authority
    verifier = TokenVerifier(KeySet([verification_key(ca_key.public_key(), certificate=ca_cert)]), issuer=ISSUER,
                             service=SERVICE, max_lifetime=MAX_LIFETIME, clock=clock, cache_size=0)
    leaf = signing_key(leaf_key)
    assert verifier.verify(sign(leaf, claims(clock), kid=None, x5c=x5c_of(leaf_cert))).subject == "alice"
    assert verifier.verify(sign(leaf, claims(clock), x5c=x5c_of(leaf_cert))).subject == "alice"
    # a known kid (the CA's) with another embedded key
    with pytest.raises(UntrustedKey, match="disagree"):
        verifier.verify(sign(leaf, claims(clock), kid=verification_key(ca_key.public_key()).kid,
                             x5c=x5c_of(leaf_cert)))
    # a certificate the attacker issued itself
    rogue = make_certificate(leaf_key, name="token CA")
    with pytest.raises(UntrustedKey, match="not issued by"):
        verifier.verify(sign(leaf, claims(clock), kid=None, x5c=x5c_of(rogue)))
    # the leaf expired (30 days)
    clock.advance(31 * 86400)
    with pytest.raises(UntrustedKey, match="not valid now"):
        verifier.verify(sign(leaf, claims(clock), kid=None, x5c=x5c_of(leaf_cert)))


def test_an_x5c_issuer_must_be_a_ca(clock, authority):
    """RFC 5280 §4.2.1.9: a certificate that says it is not a CA issues no leaf."""
    ca_key, _, leaf_key, leaf_cert = authority
    not_a_ca = make_certificate(ca_key, name="token CA", ca=False)
    verifier = TokenVerifier(KeySet([verification_key(ca_key.public_key(), certificate=not_a_ca)]),
                             issuer=ISSUER, service=SERVICE, max_lifetime=MAX_LIFETIME, clock=clock)
    with pytest.raises(UntrustedKey, match="not issued by"):
        verifier.verify(sign(signing_key(leaf_key), claims(clock), kid=None, x5c=x5c_of(leaf_cert)))


def test_keys_rotate(clock, es_key, ed_key):
    """Old and new keys both verify while both are trusted; once the old one
    is removed, its tokens are refused, cached or not."""
    verifier = verifier_for(clock, es_key, ed_key)
    old, new = issuer_for(clock, es_key).issue("a", []).token, issuer_for(clock, ed_key).issue("b", []).token
    assert verifier.verify(old).subject == "a" and verifier.verify(new).subject == "b"
    verifier.replace_keys(KeySet([ed_key.verification]))
    assert len(verifier.keys) == 1
    with pytest.raises(UntrustedKey):
        verifier.verify(old)
    assert verifier.verify(new).subject == "b"


# ---- signature and claims -----------------------------------------------------------

def test_a_tampered_payload_is_refused(clock, es_key):
    """jwt.md, "Verifying the token": the signature must be valid."""
    header, _, signature = sign(es_key, claims(clock)).split(".")
    granted = claims(clock, access=[{"type": "repository", "name": "team/app", "actions": ["push"]}])
    forged = f"{header}.{b64u(json.dumps(granted).encode())}.{signature}"
    with pytest.raises(BadSignature):
        verifier_for(clock, es_key).verify(forged)


def test_expiry_with_leeway(clock, es_key):
    """jwt.md, "Verifying the token": the current time is before exp."""
    token = sign(es_key, claims(clock))
    clock.advance(300 + LEEWAY - 1)
    verifier_for(clock, es_key).verify(token)
    clock.advance(2)
    with pytest.raises(ExpiredToken):
        verifier_for(clock, es_key).verify(token)


@pytest.mark.parametrize("changes, problem", [
    ({"exp": DROP}, "missing exp"),
    ({"exp": "soon"}, "malformed exp"),
    ({"nbf": "+120"}, "not yet valid"),
    ({"iat": "+120", "nbf": DROP}, "issued in the future"),
    ({"iat": "-500", "nbf": DROP, "exp": "+200"}, "lifetime too long"),   # exp - iat
    ({"nbf": "-500", "iat": DROP, "exp": "+200"}, "lifetime too long"),   # exp - nbf
    ({"nbf": DROP, "iat": DROP, "exp": "+700"}, "lifetime too long"),    # exp - now
    ({"iss": "evil.example.com"}, "wrong issuer"),
    ({"iss": "auth"}, "wrong issuer"),                 # a part of it (CVE-2024-53861)
    ({"iss": [ISSUER]}, "wrong issuer"),
    ({"iss": DROP}, "missing iss"),
    ({"aud": "other.example.com"}, "wrong audience"),
    ({"aud": ["a", "b"]}, "wrong audience"),
    ({"aud": f"{SERVICE}#refresh"}, "wrong audience"),
    ({"aud": DROP}, "missing aud"),
    ({"access": {"type": "repository"}}, "malformed access"),
    ({"access": [{"type": "repository", "actions": ["pull"]}]}, "malformed access"),
    ({"sub": 7}, "malformed sub"),
    ({"token_use": "refresh"}, "not an access token"),
])
def test_claims_that_are_refused(clock, es_key, changes, problem):
    """jwt.md, "Verifying the token": iss is the trusted issuer, aud names
    this registry, now is between nbf and exp, access is a list of entries;
    a lifetime longer than the registry allows, and a refresh token, refused."""
    now = int(clock())
    resolved = {k: now + int(v) if isinstance(v, str) and v[:1] in "+-" else v for k, v in changes.items()}
    with pytest.raises(InvalidClaims, match=problem):
        verifier_for(clock, es_key).verify(sign(es_key, claims(clock, **resolved)))


def test_claims_that_are_accepted(clock, es_key):
    """An audience list naming this registry; no access claim is no access;
    RFC 9068's typ for access tokens."""
    verifier = verifier_for(clock, es_key)
    for typ in ("at+jwt", "application/at+jwt", ""):            # "" leaves typ out
        assert verifier.verify(sign(es_key, claims(clock, jti=str(typ)), typ=typ)).jti == str(typ)
    assert verifier.verify(sign(es_key, claims(clock, aud=["other", SERVICE]))).subject == "alice"
    assert verifier.verify(sign(es_key, claims(clock, access=DROP))).scopes == ()


def test_refusals_say_why_without_the_token_or_its_values(clock, es_key):
    """A refusal may reach a log or a client: it says why in a few words."""
    secret = "s3cr3t-value-xyz"
    verifier = verifier_for(clock, es_key)
    for token in (sign(es_key, claims(clock, iss=secret)), sign(es_key, claims(clock, aud=secret)),
                  sign(es_key, claims(clock), kid=secret), secret):
        with pytest.raises(TokenError) as caught:
            verifier.verify(token)
        message = str(caught.value)
        assert secret not in message and token not in message and 0 < len(message) < 80


# ---- refresh tokens -----------------------------------------------------------------

def test_refresh_round_trip_and_the_kinds_do_not_mix(clock, es_key):
    """oauth.md, "Refresh token format" and scope.md, "Refresh Tokens": one
    subject, never usable at the registry; an access token is not one."""
    issuer = issuer_for(clock, es_key)
    refresh = issuer.issue_refresh("alice", "pw-fingerprint")
    assert jwt.get_unverified_header(refresh)["typ"] == "dockyard-refresh+jwt"
    assert issuer.verify_refresh(refresh) == ("alice", "pw-fingerprint")
    with pytest.raises(InvalidClaims):
        verifier_for(clock, es_key).verify(refresh)
    with pytest.raises(InvalidClaims, match="not a refresh token"):
        issuer.verify_refresh(issuer.issue("alice", []).token)


def test_a_refresh_typed_token_is_not_an_access_token(clock, es_key):
    """Only the header's typ marks it: access claims, this registry's aud."""
    token = sign(es_key, claims(clock), typ="dockyard-refresh+jwt")
    with pytest.raises(InvalidClaims, match="not an access token"):
        verifier_for(clock, es_key).verify(token)


def test_refresh_tokens_that_are_refused(clock, es_key, attacker):
    """scope.md, "Refresh Tokens": one audience, this issuer's; signed by its
    key, unexpired, and meant as a refresh token."""
    issuer = issuer_for(clock, es_key)
    other = TokenIssuer(attacker, issuer=ISSUER, service=SERVICE, lifetime=300, refresh_lifetime=86400,
                        clock=clock)
    with pytest.raises(UntrustedKey):
        issuer.verify_refresh(other.issue_refresh("alice", "b"))
    # an access token's claims under the refresh typ; then one claiming another use
    with pytest.raises(InvalidClaims, match="token_use"):
        issuer.verify_refresh(sign(es_key, claims(clock), typ="dockyard-refresh+jwt"))
    misused = claims(clock, aud=f"{SERVICE}#refresh", token_use="access", bnd="b")
    with pytest.raises(InvalidClaims, match="not a refresh token"):
        issuer.verify_refresh(sign(es_key, misused, typ="dockyard-refresh+jwt"))
    with pytest.raises(InvalidClaims, match="wrong audience"):
        issuer.verify_refresh(sign(es_key, {**misused, "token_use": "refresh", "aud": SERVICE},
                                   typ="dockyard-refresh+jwt"))
    with pytest.raises(InvalidClaims, match="wrong issuer"):
        issuer.verify_refresh(sign(es_key, {**misused, "token_use": "refresh", "iss": "other"},
                                   typ="dockyard-refresh+jwt"))
    header, body, signature = issuer.issue_refresh("alice", "b").split(".")
    with pytest.raises(BadSignature):
        issuer.verify_refresh(f"{header}.{b64u(json.dumps({'sub': 'root'}).encode())}.{signature}")
    refresh = issuer.issue_refresh("alice", "b")
    clock.advance(86400 + LEEWAY)
    with pytest.raises(ExpiredToken):
        issuer.verify_refresh(refresh)


# ---- the cache ----------------------------------------------------------------------

@pytest.fixture
def signature_checks(monkeypatch) -> list:
    calls: list = []
    real = jwt.decode

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


def test_a_verified_token_is_cached_until_it_expires(clock, es_key, signature_checks):
    """The second use costs no signature check; jwt.md, "Verifying the
    token": exp still holds for a remembered token."""
    verifier = verifier_for(clock, es_key)
    token = issuer_for(clock, es_key).issue("alice", []).token
    first = verifier.verify(token)
    assert verifier.verify(token) is first and len(signature_checks) == 1
    clock.advance(300 + LEEWAY)
    with pytest.raises(ExpiredToken):
        verifier.verify(token)
    assert len(signature_checks) == 1            # refused by the cached entry's exp


def test_the_cache_is_a_bounded_lru(clock, es_key, signature_checks):
    """Many clients cost bounded memory; the tokens in use stay cached."""
    verifier = verifier_for(clock, es_key, cache_size=2)
    one, two, three = (issuer_for(clock, es_key).issue(name, []).token for name in "abc")
    verifier.verify(one), verifier.verify(two), verifier.verify(one)       # one is the most recent
    verifier.verify(three)                                                 # evicts two
    assert len(signature_checks) == 3
    verifier.verify(one), verifier.verify(three)
    assert len(signature_checks) == 3
    verifier.verify(two)
    assert len(signature_checks) == 4


def test_replacing_the_keys_empties_the_cache(clock, es_key, signature_checks):
    """Reloaded keys: every remembered token is checked again under them."""
    verifier = verifier_for(clock, es_key)
    token = issuer_for(clock, es_key).issue("alice", []).token
    verifier.verify(token)
    verifier.replace_keys(KeySet([es_key.verification]))
    verifier.verify(token)
    assert len(signature_checks) == 2
