"""Authentication: parsing, Docker's config, and the real thing against CNCF
Distribution with token auth (the test token server of tests.support.tokens,
signing JWTs with a test RSA key) and with htpasswd Basic auth."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import sys
import uuid
from pathlib import Path

import pytest

from puller.client.auth import (AuthError, Credentials, DockerConfig, Scope, merge_scopes, parse_challenges)
from puller.client.http import ClientOptions, RegistryClient
from puller.transfer.pull import pull
from puller.transfer.push import push_image
from puller.transfer.sources import LayoutSource
from puller.client.reference import parse_reference
from puller.store import LocalStore

from tests.support import REPO_ROOT
from tests.support.content import write_oci_layout
from tests.support.launch import launch_distribution
from tests.support.tokens import serve_token_server


# -- parsing ------------------------------------------------------------------------

def test_challenge_with_quoted_commas_and_several_schemes():
    header = ('Bearer realm="https://auth.example/token?a=1,b=2",service="reg,istry",'
              'scope="repository:127.0.0.1:5000/ns/app:pull,push repository:other:pull",error="insufficient_scope", '
              'Basic realm="say \\"hi\\""')
    bearer, basic = parse_challenges(header)
    assert bearer.scheme == "bearer" and basic.scheme == "basic"
    assert bearer.realm == "https://auth.example/token?a=1,b=2"
    assert bearer.params["service"] == "reg,istry"
    assert bearer.params["error"] == "insufficient_scope"
    assert basic.realm == 'say "hi"'


def test_scope_keeps_host_port_in_repository_name():
    scope = Scope.parse("repository:127.0.0.1:5000/ns/app:pull,push")
    assert (scope.type, scope.name, scope.actions) == ("repository", "127.0.0.1:5000/ns/app", ("pull", "push"))
    assert str(scope) == "repository:127.0.0.1:5000/ns/app:pull,push"
    merged = merge_scopes([Scope.repository("dst", "pull", "push"), Scope.repository("src", "pull"),
                           Scope.repository("dst", "pull")])
    assert [str(s) for s in merged] == ["repository:dst:pull,push", "repository:src:pull"]


def test_docker_config_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({
        "auths": {"https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
                  "http://reg.example:5000/v2/": {"auth": base64.b64encode(b"bob:pa:ss").decode()}},
        "other": "kept"}))
    config = DockerConfig()
    assert config.get("docker.io") == Credentials("hub", "pw")
    assert config.get("reg.example:5000") == Credentials("bob", "pa:ss")
    assert config.get("unknown:1").anonymous
    config.store("127.0.0.1:9999", Credentials("u", "p"))
    data = json.loads((tmp_path / "config.json").read_text())
    assert base64.b64decode(data["auths"]["127.0.0.1:9999"]["auth"]) == b"u:p"
    assert data["other"] == "kept"
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o600
    assert config.erase("127.0.0.1:9999") and config.get("127.0.0.1:9999").anonymous


def test_credential_helper_protocol(tmp_path, monkeypatch):
    """credHelpers: docker-credential-<name> get/store/erase over stdin/stdout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    vault = tmp_path / "vault.json"
    helper = bin_dir / "docker-credential-testvault"
    helper.write_text(f"""#!{sys.executable}
import json, sys
path = {str(vault)!r}
try:
    data = json.load(open(path))
except FileNotFoundError:
    data = {{}}
action = sys.argv[1]
payload = sys.stdin.read()
if action == "store":
    item = json.loads(payload); data[item["ServerURL"]] = item; json.dump(data, open(path, "w"))
elif action == "get":
    key = payload.strip()
    if key not in data:
        print("credentials not found in native keychain"); sys.exit(1)
    print(json.dumps(data[key]))
elif action == "erase":
    data.pop(payload.strip(), None); json.dump(data, open(path, "w"))
""")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"credHelpers": {"reg.test:5000": "testvault"}}))
    config = DockerConfig()
    assert config.get("reg.test:5000").anonymous
    config.store("reg.test:5000", Credentials("carol", "t0ken"))
    assert json.loads(vault.read_text())["reg.test:5000"]["Secret"] == "t0ken"
    assert "\"auth\":" not in (tmp_path / "cfg" / "config.json").read_text()  # the secret stays in the helper
    assert config.get("reg.test:5000") == Credentials("carol", "t0ken")
    assert config.erase("reg.test:5000")
    assert config.get("reg.test:5000").anonymous


# -- a token server and Distribution with token auth ----------------------------------

@pytest.fixture
async def token_registry(tmp_path):
    """CNCF Distribution with token auth, its token server (tests.support.tokens)
    yielded: `.calls`, `.post_status`, `.host` (the registry's)."""
    async with serve_token_server(tmp_path) as tokens:
        registry = await asyncio.to_thread(launch_distribution, tmp_path / "registry",
                                           auth=tokens.distribution_auth())
        tokens.host = registry.host
        yield tokens
        await asyncio.to_thread(registry.stop)


ALICE = Credentials("alice", "wonderland")


def _options(host: str, creds: Credentials | None = ALICE, **extra) -> ClientOptions:
    return ClientOptions(credentials=((host, creds),) if creds else (), docker_config="/nonexistent-dockyard",
                         **extra)


async def _push_layout(tmp_path: Path, host: str, name: str, creds=ALICE, tag: str = "v1"):
    image = await asyncio.to_thread(write_oci_layout, tmp_path / f"layout-{uuid.uuid4().hex[:6]}",
                                    layer_sizes=[50_000, 2000], tag=tag)
    async with RegistryClient(_options(host, creds)) as client:
        result = await push_image(LayoutSource(LocalStore(image.path), tag), client, parse_reference(f"{host}/{name}:{tag}"))
    return image, result


@pytest.mark.interop
async def test_bearer_dance_oauth_post_push_and_pull(token_registry, tmp_path):
    host = token_registry.host
    image, pushed = await _push_layout(tmp_path, host, "private/app")
    assert pushed.digest == image.digest and pushed.blobs_uploaded == 3
    posts = [c for c in token_registry.calls if c["method"] == "POST"]
    assert posts and all(c["grant_type"] == "password" and c["user"] == "alice" for c in posts)
    assert ["repository:private/app:pull,push"] in [c["scopes"] for c in posts]
    # one token per scope set, reused: far fewer token calls than registry requests
    assert len(token_registry.calls) <= 3, token_registry.calls
    store = LocalStore(tmp_path / "store")
    result = await pull(f"{host}/private/app:v1", store=store, options=_options(host))
    assert result.manifest_digest == image.digest
    assert ["repository:private/app:pull"] in [c["scopes"] for c in token_registry.calls]


@pytest.mark.interop
async def test_oauth_post_404_falls_back_to_get(token_registry, tmp_path):
    token_registry.post_status = 404
    host = token_registry.host
    image, _ = await _push_layout(tmp_path, host, "private/fallback")
    methods = [c["method"] for c in token_registry.calls]
    assert methods[0] == "POST" and "GET" in methods
    gets = [c for c in token_registry.calls if c["method"] == "GET"]
    assert all(c["user"] == "alice" and c["account"] == "alice" for c in gets)
    store = LocalStore(tmp_path / "store")
    assert (await pull(f"{host}/private/fallback:v1", store=store, options=_options(host))).manifest_digest \
        == image.digest


@pytest.mark.interop
async def test_oauth_post_405_falls_back_to_get(token_registry, tmp_path):
    token_registry.post_status = 405
    image, _ = await _push_layout(tmp_path, token_registry.host, "private/fallback405")
    assert [c["method"] for c in token_registry.calls][:2] == ["POST", "GET"]


@pytest.mark.interop
async def test_anonymous_pull_public_and_refused_private(token_registry, tmp_path):
    host = token_registry.host
    image, _ = await _push_layout(tmp_path, host, "public/app")
    await _push_layout(tmp_path, host, "private/secret")
    store = LocalStore(tmp_path / "store")
    result = await pull(f"{host}/public/app:v1", store=store, options=_options(host, None))
    assert result.manifest_digest == image.digest
    anonymous = [c for c in token_registry.calls if c.get("user") is None]
    assert anonymous and all(c["method"] == "GET" for c in anonymous)
    with pytest.raises(AuthError):
        await pull(f"{host}/private/secret:v1", store=store, options=_options(host, None))


@pytest.mark.interop
async def test_wrong_password_is_a_clear_auth_error(token_registry, tmp_path):
    host = token_registry.host
    await _push_layout(tmp_path, host, "private/app2")
    with pytest.raises(AuthError, match="incorrect username or password"):
        await pull(f"{host}/private/app2:v1", store=LocalStore(tmp_path / "s"),
                   options=_options(host, Credentials("alice", "wrong")))


@pytest.mark.interop
async def test_cross_repo_mount_asks_both_scopes_push_first(token_registry, tmp_path):
    host = token_registry.host
    image, _ = await _push_layout(tmp_path, host, "private/base")
    store = LocalStore(tmp_path / "store")
    await pull(f"{host}/private/base:v1", store=store, options=_options(host))
    token_registry.calls.clear()
    async with RegistryClient(_options(host)) as client:
        result = await push_image(LayoutSource(store, f"{host}/private/base:v1"), client,
                                  parse_reference(f"{host}/private/derived:v1"))
    assert result.blobs_mounted == 3 and result.blobs_uploaded == 0
    assert ["repository:private/derived:pull,push", "repository:private/base:pull"] in \
        [c["scopes"] for c in token_registry.calls]


async def _run_cli(*args: str, env: dict, stdin: bytes | None = None) -> tuple[int, str, str]:
    """`dockyard ARGS` as a user runs it: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "puller", *args, env=env,
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.interop
async def test_cli_login_then_pull_with_docker_config(token_registry, tmp_path):
    host = token_registry.host
    image, _ = await _push_layout(tmp_path, host, "private/cli")
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "dockercfg"), "PYTHONPATH": str(REPO_ROOT)}

    def cli(*args, stdin: bytes | None = None):
        return _run_cli(*args, env=env, stdin=stdin)

    code, _, err = await cli("login", host, "-u", "alice", "--password-stdin", stdin=b"nope\n")
    assert code == 1 and "incorrect username or password" in err and "Traceback" not in err
    code, out, err = await cli("login", host, "-u", "alice", "--password-stdin", stdin=b"wonderland\n")
    assert code == 0, err
    saved = json.loads((tmp_path / "dockercfg" / "config.json").read_text())
    assert base64.b64decode(saved["auths"][host]["auth"]) == b"alice:wonderland"
    code, out, err = await cli("pull", "--json", "--store", str(tmp_path / "store"), f"{host}/private/cli:v1")
    assert code == 0, err
    assert json.loads(out)["manifest_digest"] == image.digest
    code, out, _ = await cli("logout", host)
    assert code == 0 and host not in json.loads((tmp_path / "dockercfg" / "config.json").read_text())["auths"]


# -- htpasswd (Basic) ---------------------------------------------------------------

@pytest.fixture
def basic_registry(tmp_path):
    import bcrypt
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("bob:" + bcrypt.hashpw(b"builder", bcrypt.gensalt(rounds=5)).decode() + "\n")
    auth = f"  htpasswd:\n    realm: basic-realm\n    path: {htpasswd}\n"
    registry = launch_distribution(tmp_path / "registry", auth=auth)
    yield registry.host
    registry.stop()


@pytest.mark.interop
async def test_basic_auth_against_htpasswd(basic_registry, tmp_path):
    host = basic_registry
    bob = Credentials("bob", "builder")
    image, pushed = await _push_layout(tmp_path, host, "team/app", creds=bob)
    assert pushed.digest == image.digest
    store = LocalStore(tmp_path / "store")
    result = await pull(f"{host}/team/app:v1", store=store, options=_options(host, bob))
    assert result.manifest_digest == image.digest
    with pytest.raises(AuthError, match="authentication to .* failed"):
        await pull(f"{host}/team/app:v1", store=store, options=_options(host, Credentials("bob", "nope")))
    with pytest.raises(AuthError, match="dockyard login"):
        await pull(f"{host}/team/app:v1", store=store, options=_options(host, None))


def test_token_cache_until_expiry():
    from puller.client.tokens import TokenCache, token_from_response
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    key = TokenCache.key("https://auth/token", "svc", [Scope.repository("a", "pull")], "alice")
    other = TokenCache.key("https://auth/token", "svc", [Scope.repository("a", "pull", "push")], "alice")
    cache.put(key, token_from_response({"token": "t1", "expires_in": 300}, now=now[0]))
    assert cache.get(key).value == "t1" and cache.get(other) is None
    now[0] += 290
    assert cache.get(key).value == "t1"
    now[0] += 10          # inside the safety margin before expiry: no longer used
    assert cache.get(key) is None
    # expires_in below the spec's 60 s minimum is raised to 60; access_token is accepted
    cache.put(key, token_from_response({"access_token": "t2", "expires_in": 5}, now=now[0]))
    now[0] += 50
    assert cache.get(key).value == "t2"
    with pytest.raises(AuthError):
        token_from_response({"expires_in": 60})


@pytest.mark.interop
async def test_docker_login_and_dockyard_login_share_credentials(basic_registry, dockerd, tmp_path):
    """`docker login` -> dockyard pulls; `dockyard login` -> docker pulls (same config.json)."""
    host = basic_registry
    image, _ = await _push_layout(tmp_path, host, "team/shared", creds=Credentials("bob", "builder"))
    config_dir = Path(dockerd.env["DOCKER_CONFIG"])
    await asyncio.to_thread(dockerd.run, "login", host, "-u", "bob", "--password-stdin", input=b"builder\n")
    env = {**os.environ, "DOCKER_CONFIG": str(config_dir), "PYTHONPATH": str(REPO_ROOT)}

    def cli(*args, stdin: bytes | None = None):
        return _run_cli(*args, env=env, stdin=stdin)

    code, out, err = await cli("pull", "--json", "--store", str(tmp_path / "store"), f"{host}/team/shared:v1")
    assert code == 0, err
    assert json.loads(out)["manifest_digest"] == image.digest
    # now the other way round: forget docker's login, log in with dockyard, docker pulls
    await asyncio.to_thread(dockerd.run, "logout", host)
    code, _, err = await cli("pull", "--store", str(tmp_path / "store2"), f"{host}/team/shared:v1")
    assert code == 1 and "dockyard login" in err
    code, _, err = await cli("login", host, "-u", "bob", "--password-stdin", stdin=b"builder\n")
    assert code == 0, err
    pulled = await asyncio.to_thread(dockerd.run, "pull", f"{host}/team/shared:v1", check=False)
    # the test layout's layers are not runnable, but docker must get past auth and fetch them
    assert pulled.returncode == 0, pulled.stderr
