"""Docker token authentication for tests: an issuer that signs JWTs the way
a registry's token service does, and a token endpoint in front of it.

    async with serve_token_server(tmp_path) as tokens:
        registry = launch_distribution(tmp_path / "reg", auth=tokens.distribution_auth())

The endpoint speaks both flows a client may use: GET with Basic
credentials (or none) and the scopes in the query, and the OAuth2 POST
(grant_type=password). Its policy is small and fixed: a known user gets
every action asked for; an anonymous caller gets `pull` on `public/*`;
wrong credentials get 401. Every call is recorded in `calls`.

The issuer's certificate (`bundle`) is what a registry is told to trust
(Distribution's `rootcertbundle`); tokens carry it in the `x5c` header.
"""

from __future__ import annotations

import base64
import datetime
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Mapping, Sequence

from aiohttp import web


def parse_scope(text: str) -> tuple[str, str, tuple[str, ...]]:
    """"type:name:actions" -> (type, name, actions); the name may hold colons
    (a registry host with a port). ValueError when a part is missing."""
    kind, sep, rest = text.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not kind or not name:
        raise ValueError(f"invalid scope {text!r}")
    return kind, name, tuple(action for action in actions.split(",") if action)


class TokenIssuer:
    """An RSA signing key and its self-signed certificate (written to
    `directory/signer.pem`), issuing RS256 tokens for one service."""

    def __init__(self, directory: str | Path, *, service: str = "dockyard-test-registry",
                 issuer: str = "dockyard-test-issuer", expires_in: int = 300):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.service, self.issuer, self.expires_in = service, issuer, expires_in
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dockyard test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        self.bundle = Path(directory) / "signer.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        self.public_key_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

    def issue(self, subject: str | None, access: Sequence[Mapping], *, expires_in: int | None = None,
              **claims) -> str:
        """A signed token for `subject` ("" when anonymous) granting `access`
        ([{"type", "name", "actions"}]); extra claims override the usual ones."""
        import jwt

        now = int(time.time())
        body = {"iss": self.issuer, "sub": subject or "", "aud": self.service,
                "exp": now + (self.expires_in if expires_in is None else expires_in),
                "nbf": now - 30, "iat": now, "jti": uuid.uuid4().hex,
                "access": [dict(entry) for entry in access], **claims}
        return jwt.encode(body, self.key_pem, algorithm="RS256", headers={"x5c": [self.x5c]})

    def decode(self, token: str) -> dict:
        """The claims of a token this issuer signed (signature, audience and time checked)."""
        import jwt

        return jwt.decode(token, self.public_key_pem, algorithms=["RS256"], audience=self.service,
                          issuer=self.issuer)


class TokenServer:
    """The token endpoint: `handle` serves GET and POST on one route."""

    SERVICE = "dockyard-test-registry"
    ISSUER = "dockyard-test-issuer"
    USERS = {"alice": "wonderland"}

    def __init__(self, issuer: TokenIssuer, users: Mapping[str, str] | None = None):
        self.issuer = issuer
        self.users = dict(self.USERS if users is None else users)
        self.post_status: int | None = None      # e.g. 404: "no OAuth2 here"
        self.calls: list[dict] = []
        self.realm: str | None = None             # set once it listens
        self.host: str | None = None              # free for the test: the registry it guards

    def grant(self, user: str | None, scopes: Sequence[str]) -> list[dict]:
        access = []
        for text in scopes:
            kind, name, actions = parse_scope(text)
            if user:
                allowed = list(actions)
            else:
                allowed = [a for a in actions if a == "pull" and name.startswith("public/")]
            access.append({"type": kind, "name": name, "actions": allowed})
        return access

    def _token(self, user: str | None, scopes: Sequence[str]) -> web.Response:
        token = self.issuer.issue(user, self.grant(user, scopes))
        return web.json_response({"token": token, "access_token": token,
                                  "expires_in": self.issuer.expires_in,
                                  "issued_at": datetime.datetime.now(datetime.timezone.utc).isoformat()})

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            form = await request.post()
            scopes = (form.get("scope") or "").split()
            self.calls.append({"method": "POST", "grant_type": form.get("grant_type"),
                               "scopes": scopes, "user": form.get("username")})
            if self.post_status:
                return web.Response(status=self.post_status)
            user, password = form.get("username"), form.get("password")
            if self.users.get(user) != password:
                return web.json_response({"error": "invalid_grant"}, status=401)
            return self._token(user, scopes)
        scopes = request.query.getall("scope", [])
        user = None
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(user) != password:
                self.calls.append({"method": "GET", "scopes": scopes, "user": user, "denied": True})
                return web.json_response({"details": "bad credentials"}, status=401)
        self.calls.append({"method": "GET", "scopes": scopes, "user": user,
                           "account": request.query.get("account")})
        return self._token(user, scopes)

    def distribution_auth(self) -> dict:
        """The `auth:` section that makes CNCF Distribution trust this endpoint."""
        return {"token": {"realm": self.realm, "service": self.issuer.service,
                          "issuer": self.issuer.issuer, "rootcertbundle": str(self.issuer.bundle)}}


@asynccontextmanager
async def serve_token_server(directory: str | Path, *, users: Mapping[str, str] | None = None,
                             path: str = "/token") -> AsyncIterator[TokenServer]:
    """A TokenServer listening on 127.0.0.1 (a free port) at `path` while
    the block runs; its key and certificate are kept in `directory`."""
    tokens = TokenServer(TokenIssuer(directory, service=TokenServer.SERVICE, issuer=TokenServer.ISSUER),
                         users)
    app = web.Application()
    app.router.add_route("*", path, tokens.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        tokens.realm = f"http://127.0.0.1:{port}{path}"
        yield tokens
    finally:
        await runner.cleanup()
