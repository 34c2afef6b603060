"""`dockyard login` stores what `docker login` stores, `dockyard logout` removes it.

Against a token registry the password is exchanged for an identity token
(the OAuth2 refresh token a token server issues for offline access) and
config.json keeps `{"auth": base64("user:"), "identitytoken": "..."}`, no
password; later commands use grant_type=refresh_token. A token server that
issues no refresh token, or a Basic registry, gets the password saved.

Two halves:
- a scriptable token server beside the fake registry (tests.client.fakeregistry),
  recording every form and query: what the client sends at login, the GET
  fallback, the no-refresh-token case, refusals, credential helpers;
- the real thing: `dockyard serve --auth token` with htpasswd users and the
  example policy, driven by the `dockyard` CLI as a user runs it (login, push,
  pull, inspect through the identity token; revoked by a password change;
  logout), and docker reading and writing the same config.json.

No secret is ever allowed on stdout or stderr: every command's output is
checked for the passwords and tokens in play.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import pytest
from aiohttp import web

from puller.client.auth import Credentials, DockerConfig
from tests.client.fakeregistry import start_app
from tests.support import REPO_ROOT
from tests.support.auth import EXAMPLE_POLICY, USERS, access_of, write_htpasswd, write_policy
from tests.support.content import write_oci_layout
from tests.support.registry_http import http_request

ALICE, ALICE_PASSWORD = "alice", "wonderland-7"


# -- running the CLI ------------------------------------------------------------------

@dataclass
class Cli:
    """`dockyard` as a user runs it, with its own HOME and DOCKER_CONFIG;
    every output is checked for the secrets in `secrets`."""
    home: Path
    config_dir: Path
    extra_env: dict = field(default_factory=dict)
    secrets: set = field(default_factory=set)

    @property
    def config_path(self) -> Path:
        return self.config_dir / "config.json"

    def config(self) -> dict:
        return json.loads(self.config_path.read_text())

    def entry(self, host: str) -> dict | None:
        if not self.config_path.exists():
            return None
        return (self.config().get("auths") or {}).get(host)

    async def __call__(self, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        env = {**os.environ, "HOME": str(self.home), "DOCKER_CONFIG": str(self.config_dir),
               "PYTHONPATH": str(REPO_ROOT), **self.extra_env}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "puller", *args, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
        out, err = out.decode(), err.decode()
        for secret in self.secrets:
            assert secret not in out and secret not in err, f"a secret reached the output of {args[0]}"
        assert "Traceback" not in err, err
        return proc.returncode, out, err

    async def login(self, host: str, user: str, password: str, *flags: str) -> tuple[int, str, str]:
        self.secrets.add(password)
        return await self("login", host, "--username", user, "--password-stdin", "--plain-http", *flags,
                          stdin=password.encode() + b"\n")


@pytest.fixture
def cli(tmp_path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home=home, config_dir=home / ".docker")


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dockyard: error: "), err
    return lines[0]


def decoded_auth(entry: dict) -> str:
    return base64.b64decode(entry["auth"]).decode()


# -- a scriptable token server beside the fake registry ---------------------------------

@dataclass
class FakeTokenServer:
    """A token endpoint (POST form and GET) for alice, recording each call."""
    refresh_token: str | None = None            # answered for offline access; None: never issued
    post_status: int | None = None              # answer every POST with this status (404: GET only)
    revoked: bool = False                       # the refresh token is refused
    revoked_status: int = 401                   # 401 (token.md) or 400 invalid_grant (RFC 6749)
    calls: list = field(default_factory=list)   # {"method", "fields" (form or query), "basic"}
    issued: list = field(default_factory=list)  # access tokens handed out

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/token", self._token)
        return app

    def _answer(self, offline: bool) -> web.Response:
        token = "access-" + uuid.uuid4().hex
        self.issued.append(token)
        body = {"token": token, "expires_in": 300}
        if offline and self.refresh_token:
            body["refresh_token"] = self.refresh_token
        return web.json_response(body)

    @staticmethod
    def _refused(status: int = 401, description: str = "incorrect username or password") -> web.Response:
        return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": description}],
                                  "error": "invalid_grant", "error_description": description}, status=status)

    async def _token(self, request: web.Request) -> web.Response:
        basic = request.headers.get("Authorization")
        if request.method == "POST":
            fields = dict(await request.post())
            self.calls.append({"method": "POST", "fields": fields, "basic": basic})
            if self.post_status:
                return web.json_response({"errors": [{"code": "UNSUPPORTED", "message": "no"}]},
                                         status=self.post_status)
            if fields.get("grant_type") == "password":
                if (fields.get("username"), fields.get("password")) != (ALICE, ALICE_PASSWORD):
                    return self._refused()
                return self._answer(fields.get("access_type") == "offline")
            if fields.get("grant_type") == "refresh_token":
                if self.revoked or fields.get("refresh_token") != self.refresh_token:
                    return self._refused(self.revoked_status, "the refresh token was revoked")
                return self._answer(False)
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        fields = {key: request.query.getall(key) for key in request.query}
        self.calls.append({"method": "GET", "fields": fields, "basic": basic})
        if basic is None:
            return self._answer(False)
        expected = "Basic " + base64.b64encode(f"{ALICE}:{ALICE_PASSWORD}".encode()).decode()
        if basic != expected:
            return self._refused()
        return self._answer(request.query.get("offline_token") == "true")


@pytest.fixture
async def tokens(fake):
    """The fake registry (`tokens.registry`) asking for tokens of this server."""
    server = FakeTokenServer()
    runner, host = await start_app(server.app())
    fake.challenge = f'Bearer realm="http://{host}/token",service="fake-registry"'
    server.registry = fake
    yield server
    await runner.cleanup()


async def test_login_asks_offline_access_and_saves_the_identity_token(tokens, cli):
    tokens.refresh_token = "identity-" + uuid.uuid4().hex
    cli.secrets.add(tokens.refresh_token)
    host = tokens.registry.host
    code, out, err = await cli.login(host, ALICE, ALICE_PASSWORD)
    assert code == 0, err
    assert out.strip() == f"Login Succeeded (identity token saved in {cli.config_path})"
    # the form docker sends at login (oauth.md): the password grant, offline access, an empty scope
    (post,) = [c for c in tokens.calls if c["method"] == "POST"]
    assert post["fields"] == {"grant_type": "password", "username": ALICE, "password": ALICE_PASSWORD,
                              "service": "fake-registry", "client_id": "dockyard", "access_type": "offline",
                              "scope": ""}
    assert post["basic"] is None
    # what docker writes: the user name with an empty password, and the identity token
    assert cli.entry(host) == {"auth": base64.b64encode(f"{ALICE}:".encode()).decode(),
                               "identitytoken": tokens.refresh_token}
    assert ALICE_PASSWORD not in cli.config_path.read_text()
    # the login was checked: GET /v2/ with the access token just issued
    v2 = [r for r in tokens.registry.requests if r.path == "/v2/" and r.headers.get("Authorization")]
    assert v2 and v2[-1].headers["Authorization"] == f"Bearer {tokens.issued[0]}"


async def test_identity_token_used_by_the_next_command_then_revoked(tokens, cli):
    tokens.refresh_token = "identity-" + uuid.uuid4().hex
    cli.secrets.add(tokens.refresh_token)
    host = tokens.registry.host
    pushed = tokens.registry.add_image("team/app", "v1", [b"layer one"])
    assert (await cli.login(host, ALICE, ALICE_PASSWORD))[0] == 0
    tokens.calls.clear()
    code, out, err = await cli("inspect", "--remote", "--plain-http", f"{host}/team/app:v1")
    assert code == 0, err
    assert json.loads(out)["digest"] == pushed["digest"]
    assert tokens.calls and all(c["method"] == "POST" for c in tokens.calls)
    for call in tokens.calls:
        assert call["fields"]["grant_type"] == "refresh_token"
        assert call["fields"]["refresh_token"] == tokens.refresh_token
        assert call["fields"]["access_type"] == "online" and call["fields"]["client_id"] == "dockyard"
        assert "password" not in call["fields"] and "username" not in call["fields"]
        assert call["fields"]["scope"] == "repository:team/app:pull"
    # revoked: one line that says to log in again, and exit 1
    for status in (401, 400):
        tokens.revoked, tokens.revoked_status = True, status
        code, out, err = await cli("inspect", "--remote", "--plain-http", f"{host}/team/app:v1")
        assert code == 1 and out == ""
        line = one_error_line(err)
        assert "saved login was refused" in line and f"dockyard login {host}" in line, line
        assert "the refresh token was revoked" in line


async def test_no_refresh_token_saves_the_password(tokens, cli):
    """A token server that issues no refresh token: the password is saved, as docker does."""
    host = tokens.registry.host
    code, out, err = await cli.login(host, ALICE, ALICE_PASSWORD)
    assert code == 0, err
    assert "password saved in" in out
    assert cli.entry(host) == {"auth": base64.b64encode(f"{ALICE}:{ALICE_PASSWORD}".encode()).decode()}
    assert [c["fields"]["access_type"] for c in tokens.calls if c["method"] == "POST"] == ["offline"]
    tokens.calls.clear()
    tokens.registry.add_image("team/app", "v1", [b"x"])
    code, _, err = await cli("inspect", "--remote", "--plain-http", f"{host}/team/app:v1")
    assert code == 0, err
    assert [c["fields"]["grant_type"] for c in tokens.calls] == ["password"]


async def test_get_fallback_asks_offline_token_with_basic(tokens, cli):
    """A token server without the OAuth2 POST (404): GET with Basic,
    offline_token=true and client_id (token.md); its refresh token is saved."""
    tokens.post_status = 404
    tokens.refresh_token = "identity-" + uuid.uuid4().hex
    cli.secrets.add(tokens.refresh_token)
    host = tokens.registry.host
    code, out, err = await cli.login(host, ALICE, ALICE_PASSWORD)
    assert code == 0, err
    assert [c["method"] for c in tokens.calls] == ["POST", "GET"]
    get = tokens.calls[1]
    assert get["basic"] == "Basic " + base64.b64encode(f"{ALICE}:{ALICE_PASSWORD}".encode()).decode()
    assert get["fields"] == {"service": ["fake-registry"], "account": [ALICE], "offline_token": ["true"],
                             "client_id": ["dockyard"]}
    assert cli.entry(host) == {"auth": base64.b64encode(f"{ALICE}:".encode()).decode(),
                               "identitytoken": tokens.refresh_token}


async def test_wrong_password_is_one_line_and_saves_nothing(tokens, cli):
    tokens.refresh_token = "identity-" + uuid.uuid4().hex
    host = tokens.registry.host
    code, out, err = await cli.login(host, ALICE, "not-the-password")
    assert code == 1 and out == ""
    assert one_error_line(err) == f"dockyard: error: authentication to {host} failed: incorrect username or password"
    assert not cli.config_path.exists()
    code, out, err = await cli.login(host, ALICE, "still-not-it", "--json")
    assert code == 1
    assert json.loads(out) == {"error": f"authentication to {host} failed: incorrect username or password"}
    one_error_line(err)
    # an empty password is refused before anything is sent (an anonymous token would "succeed")
    tokens.calls.clear()
    code, out, err = await cli("login", host, "-u", ALICE, "--password-stdin", "--plain-http", stdin=b"\n")
    assert code == 1 and "password is required" in one_error_line(err)
    assert tokens.calls == [] and not cli.config_path.exists()


async def test_json_and_quiet(tokens, cli):
    tokens.refresh_token = "identity-" + uuid.uuid4().hex
    cli.secrets.add(tokens.refresh_token)
    host = tokens.registry.host
    code, out, err = await cli.login(host, ALICE, ALICE_PASSWORD, "--json")
    assert code == 0, err
    assert json.loads(out) == {"registry": host, "username": ALICE, "saved": "identity_token",
                               "location": str(cli.config_path)}
    code, out, err = await cli.login(host, ALICE, ALICE_PASSWORD, "--quiet")
    assert (code, out, err) == (0, "", "")
    code, out, _ = await cli("logout", host, "--json")
    assert code == 0 and json.loads(out) == {"registry": host, "removed": True}
    code, out, _ = await cli("logout", host, "--json")
    assert code == 0 and json.loads(out) == {"registry": host, "removed": False}
    assert (await cli.login(host, ALICE, ALICE_PASSWORD))[0] == 0
    assert await cli("logout", host, "-q") == (0, "", "")
    assert cli.entry(host) is None


# -- logout: file entries and credential helpers ------------------------------------------

HELPER = """#!{python}
import json, sys
path = {vault!r}
try:
    data = json.load(open(path))
except FileNotFoundError:
    data = {{}}
action, payload = sys.argv[1], sys.stdin.read()
if action == "store":
    item = json.loads(payload); data[item["ServerURL"]] = item
elif action == "get":
    if payload.strip() not in data:
        print("credentials not found in native keychain"); sys.exit(1)
    print(json.dumps(data[payload.strip()]))
elif action == "erase":
    if payload.strip() not in data:
        print("credentials not found in native keychain"); sys.exit(1)
    del data[payload.strip()]
json.dump(data, open(path, "w"))
"""


def install_helper(tmp_path: Path, cli: Cli, name: str = "testvault") -> Path:
    """docker-credential-NAME on the CLI's PATH, keeping its secrets in a JSON file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    vault = tmp_path / f"{name}.json"
    helper = bin_dir / f"docker-credential-{name}"
    helper.write_text(HELPER.format(python=sys.executable, vault=str(vault)))
    helper.chmod(0o755)
    cli.extra_env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    return vault


@pytest.mark.parametrize("setting", ["credsStore", "credHelpers"])
async def test_identity_token_in_a_credential_helper_then_logout(tokens, cli, tmp_path, setting):
    tokens.refresh_token = "identity-" + uuid.uuid4().hex
    cli.secrets.add(tokens.refresh_token)
    host = tokens.registry.host
    vault = install_helper(tmp_path, cli)
    cli.config_dir.mkdir()
    cli.config_path.write_text(json.dumps({"credsStore": "testvault"} if setting == "credsStore"
                                          else {"credHelpers": {host: "testvault"}}))
    code, out, err = await cli.login(host, ALICE, ALICE_PASSWORD)
    assert code == 0, err
    assert "docker-credential-testvault" in out
    # docker's native store: user name "<token>" and the identity token as the secret; config.json keeps {}
    assert json.loads(vault.read_text()) == {host: {"ServerURL": host, "Username": "<token>",
                                                    "Secret": tokens.refresh_token}}
    assert cli.entry(host) == {}
    assert tokens.refresh_token not in cli.config_path.read_text()
    tokens.registry.add_image("team/app", "v1", [b"in the vault"])
    tokens.calls.clear()
    code, _, err = await cli("inspect", "--remote", "--plain-http", f"{host}/team/app:v1")
    assert code == 0, err
    assert {c["fields"]["grant_type"] for c in tokens.calls} == {"refresh_token"}
    code, out, err = await cli("logout", host)
    assert (code, out.strip()) == (0, f"Removing login credentials for {host}"), err
    assert json.loads(vault.read_text()) == {}
    assert cli.entry(host) is None
    code, out, _ = await cli("logout", host)
    assert (code, out.strip()) == (0, f"Not logged in to {host}")


async def test_logout_removes_every_key_form_of_the_registry(cli, tmp_path):
    """Entries written by other tools under `https://host` or `http://host/v2/`,
    with an identity token or a password, in the file and in a helper."""
    host = "127.0.0.1:5999"
    vault = install_helper(tmp_path, cli)
    vault.write_text(json.dumps({f"https://{host}": {"ServerURL": f"https://{host}", "Username": "<token>",
                                                     "Secret": "helper-identity"}}))
    cli.config_dir.mkdir()
    other = {"auth": base64.b64encode(b"bob:pw").decode()}
    cli.config_path.write_text(json.dumps({
        "auths": {host: {"auth": base64.b64encode(b"alice:").decode(), "identitytoken": "file-identity"},
                  f"http://{host}/v2/": {"auth": base64.b64encode(b"alice:pw").decode()},
                  f"https://{host}": {},
                  "127.0.0.1:6000": other},
        "credHelpers": {f"https://{host}": "testvault"}, "psFormat": "kept"}))
    code, out, err = await cli("logout", host)
    assert (code, out.strip()) == (0, f"Removing login credentials for {host}"), err
    saved = cli.config()
    assert saved["auths"] == {"127.0.0.1:6000": other} and saved["psFormat"] == "kept"
    assert json.loads(vault.read_text()) == {}


async def test_logout_reports_a_failing_helper(cli, tmp_path):
    """A helper that cannot erase: one line, exit 1, and the config.json entry gone anyway."""
    host = "127.0.0.1:5998"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-broken"
    helper.write_text("#!/bin/sh\necho 'keychain is locked'\nexit 1\n")
    helper.chmod(0o755)
    cli.extra_env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    cli.config_dir.mkdir()
    cli.config_path.write_text(json.dumps({"auths": {host: {}}, "credsStore": "broken"}))
    code, out, err = await cli("logout", host)
    assert code == 1
    line = one_error_line(err)
    assert "docker-credential-broken erase: keychain is locked" in line, line
    assert cli.entry(host) is None


def test_credentials_repr_shows_no_secret():
    creds = Credentials("alice", "pass-word-1", "identity-token-1")
    assert "pass-word-1" not in repr(creds) and "identity-token-1" not in repr(creds)
    assert "alice" in repr(creds)


def test_store_writes_what_docker_writes(tmp_path):
    config = DockerConfig(tmp_path)
    config.store("reg.example:5000", Credentials("alice", None, "rt-1"))
    config.store("other.example", Credentials(identity_token="rt-2"))
    auths = json.loads((tmp_path / "config.json").read_text())["auths"]
    assert auths["reg.example:5000"] == {"auth": base64.b64encode(b"alice:").decode(), "identitytoken": "rt-1"}
    assert auths["other.example"] == {"identitytoken": "rt-2"}          # encodeAuth: no "auth" for neither
    assert config.get("reg.example:5000") == Credentials("alice", None, "rt-1")


# -- the real thing: dockyard serve --auth token --------------------------------------------

@dataclass
class TokenDockyard:
    host: str
    htpasswd: Path
    server: object              # tests.support.launch.RegistryServer
    users: dict

    def set_password(self, user: str, password: str) -> None:
        """Change a password in the htpasswd file and have the server re-read it (SIGHUP)."""
        self.users = {**self.users, user: password}
        write_htpasswd(self.htpasswd, self.users)
        os.kill(self.server.server.pid, signal.SIGHUP)

    def token_form(self, **fields: str):
        """POST the OAuth2 form to the server's token endpoint by hand."""
        return http_request("POST", f"http://{self.host}/auth/token", urlencode(fields).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})


@pytest.fixture
def token_dockyard(start_dockyard, tmp_path) -> TokenDockyard:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", USERS)
    policy = write_policy(tmp_path / "policy.yml", EXAMPLE_POLICY)
    server = start_dockyard(extra_args=["--auth", "token", "--htpasswd", str(htpasswd), "--policy", str(policy),
                                        "--access-log"])
    return TokenDockyard(server.host, htpasswd, server, dict(USERS))


async def _until(check, timeout: float = 15.0):
    """Await check() until it returns something true (SIGHUP and the reload are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.2)


async def test_real_login_push_pull_through_the_identity_token_revoke_logout(token_dockyard, cli, tmp_path):
    registry = token_dockyard
    host = registry.host
    password = USERS["builder"]
    cli.secrets.update(USERS.values())

    # a wrong password: one line, exit 1, nothing saved
    code, out, err = await cli.login(host, "builder", "wrong-password")
    assert code == 1 and out == ""
    assert "incorrect username or password" in one_error_line(err)
    assert not cli.config_path.exists()

    code, out, err = await cli.login(host, "builder", password)
    assert code == 0, err
    assert out.strip() == f"Login Succeeded (identity token saved in {cli.config_path})"
    entry = cli.entry(host)
    assert set(entry) == {"auth", "identitytoken"} and decoded_auth(entry) == "builder:"
    identity = entry["identitytoken"]
    cli.secrets.add(identity)
    assert password not in cli.config_path.read_text()

    # the server takes the identity token as a refresh grant, and hands back the same one (oauth.md)
    answer = registry.token_form(grant_type="refresh_token", refresh_token=identity, service="dockyard",
                                 client_id="dockyard", scope="repository:team-a/app:pull,push")
    assert answer.status == 200, answer.body
    assert answer.json()["refresh_token"] == identity
    assert access_of(answer.json()["token"]) == {("repository", "team-a/app"): {"pull", "push"}}

    # push and pull with nothing but the identity token in config.json
    image = await asyncio.to_thread(write_oci_layout, tmp_path / "layout", layer_sizes=[20_000], tag="v1")
    code, out, err = await cli("push", "--json", "--plain-http", f"oci:{image.path}:v1", f"{host}/team-a/app:v1")
    assert code == 0, err
    assert json.loads(out)["digest"] == image.digest
    code, out, err = await cli("pull", "--json", "--plain-http", "--store", str(tmp_path / "store"),
                               f"{host}/team-a/app:v1")
    assert code == 0, err
    assert json.loads(out)["manifest_digest"] == image.digest
    code, out, err = await cli("inspect", "--remote", "--plain-http", f"{host}/team-a/app:v1")
    assert code == 0, err
    assert json.loads(out)["digest"] == image.digest
    log = registry.server.log()
    assert "POST /auth/token" in log
    for secret in (password, identity):
        assert secret not in log, "a secret reached the server's log"

    # a changed password revokes the identity token: one clear line, exit 1
    registry.set_password("builder", "builder-new-secret-5")
    cli.secrets.add("builder-new-secret-5")

    async def refused():
        code, out, err = await cli("inspect", "--remote", "--plain-http", f"{host}/team-a/app:v1")
        return (code, out, err) if code != 0 else None
    result = await _until(refused)
    assert result, "the identity token still works after the password changed"
    code, out, err = result
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert "saved login was refused" in line and f"dockyard login {host}" in line, line
    answer = registry.token_form(grant_type="refresh_token", refresh_token=identity, service="dockyard",
                                 client_id="dockyard", scope="")
    assert answer.status == 401 and answer.json().get("error") == "invalid_grant"

    # log in again with the new password: a new identity token, which works
    code, _, err = await cli.login(host, "builder", "builder-new-secret-5")
    assert code == 0, err
    renewed = cli.entry(host)["identitytoken"]
    cli.secrets.add(renewed)
    assert renewed != identity
    code, out, err = await cli("inspect", "--remote", "--plain-http", f"{host}/team-a/app:v1")
    assert code == 0, err

    # logout removes the entry; the private repository is out of reach again
    code, out, _ = await cli("logout", host)
    assert (code, out.strip()) == (0, f"Removing login credentials for {host}")
    assert cli.entry(host) is None
    code, out, err = await cli("inspect", "--remote", "--plain-http", f"{host}/team-a/app:v1")
    assert code == 1 and "dockyard login" in one_error_line(err)


async def test_real_login_as_a_reader_gets_only_pull(token_dockyard, cli, tmp_path):
    """The identity token carries the user, not the access: the policy still decides."""
    registry = token_dockyard
    host = registry.host
    cli.secrets.update(USERS.values())
    image = await asyncio.to_thread(write_oci_layout, tmp_path / "layout", layer_sizes=[5000], tag="v1")
    code, _, err = await cli("push", "--plain-http", "--creds", f"builder:{USERS['builder']}",
                             f"oci:{image.path}:v1", f"{host}/team-a/app:v1")
    assert code == 0, err
    assert (await cli.login(host, "reader", USERS["reader"]))[0] == 0
    cli.secrets.add(cli.entry(host)["identitytoken"])
    code, out, err = await cli("pull", "--json", "--plain-http", "--store", str(tmp_path / "store"),
                               f"{host}/team-a/app:v1")
    assert code == 0, err
    code, _, err = await cli("push", "--plain-http", f"oci:{image.path}:v1", f"{host}/team-a/app:v2")
    assert code == 1
    one_error_line(err)


async def test_real_lockout_is_one_line_at_once(token_dockyard, cli):
    """After too many wrong passwords the token server answers 429 with a
    Retry-After of minutes: login says so at once instead of retrying."""
    registry = token_dockyard
    host = registry.host
    cli.secrets.update(USERS.values())
    for attempt in range(30):
        code, out, err = await cli.login(host, "builder", f"wrong-{attempt}")
        assert code == 1
        if "too many failed logins" in err:
            break
    else:
        pytest.fail("no lockout after 30 wrong passwords")
    started = time.monotonic()
    code, out, err = await cli.login(host, "builder", USERS["builder"])
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert "429" in line and "too many failed logins" in line, line
    assert time.monotonic() - started < 5, "the lockout answer was retried"
    assert not cli.config_path.exists()


@pytest.mark.interop
async def test_docker_and_dockyard_share_identity_tokens(token_dockyard, dockerd, cli, tmp_path):
    """`docker login` -> dockyard pulls with docker's identity token; `dockyard
    login` -> docker pulls with dockyard's: the same config.json entries."""
    registry = token_dockyard
    host = registry.host
    password = USERS["builder"]
    cli.secrets.update(USERS.values())
    image = await asyncio.to_thread(write_oci_layout, tmp_path / "layout", layer_sizes=[5000], tag="v1")
    code, _, err = await cli("push", "--plain-http", "--creds", f"builder:{password}", f"oci:{image.path}:v1",
                             f"{host}/team-a/app:v1")
    assert code == 0, err

    docker_config = tmp_path / "docker-config"
    docker_config.mkdir()
    await asyncio.to_thread(dockerd.run, "--config", str(docker_config), "login", host, "-u", "builder",
                            "--password-stdin", input=password.encode() + b"\n")
    written = json.loads((docker_config / "config.json").read_text())["auths"][host]
    assert set(written) == {"auth", "identitytoken"} and decoded_auth(written) == "builder:"
    cli.config_dir.mkdir(exist_ok=True)
    cli.config_path.write_text(json.dumps({"auths": {host: written}}))
    cli.secrets.add(written["identitytoken"])
    code, out, err = await cli("pull", "--json", "--plain-http", "--store", str(tmp_path / "store"),
                               f"{host}/team-a/app:v1")
    assert code == 0, err
    assert json.loads(out)["manifest_digest"] == image.digest

    # the other way round
    assert (await cli("logout", host))[0] == 0
    assert (await cli.login(host, "builder", password))[0] == 0
    ours = cli.entry(host)
    cli.secrets.add(ours["identitytoken"])
    (docker_config / "config.json").write_text(json.dumps({"auths": {host: ours}}))
    pulled = await asyncio.to_thread(dockerd.run, "--config", str(docker_config), "pull", f"{host}/team-a/app:v1",
                                     check=False)
    # the test layout's layers are not runnable, but docker must get past auth and fetch them
    assert pulled.returncode == 0, pulled.stderr
