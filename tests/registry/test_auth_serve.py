"""`dockyard serve` with auth, as a process: the signing key made once and
shared by every worker and restart, SIGHUP re-reading the files in every
worker, one-line errors for unusable auth files, and no secret in a log
line of a whole authenticated session at debug level."""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.support import REPO_ROOT
from tests.support.auth import EXAMPLE_POLICY, USERS, basic, claims_of, write_htpasswd, write_policy
from tests.support.content import sha256_digest
from tests.support.launch import dockyard_command, launch_dockyard


def call(url: str, method: str = "GET", headers: dict | None = None, data: bytes | None = None,
         ) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_token(base: str, user: str | None, *scopes: str, offline: bool = False) -> dict:
    query = [("service", "dockyard"), *(("scope", s) for s in scopes)]
    if offline:
        query.append(("offline_token", "true"))
    headers = {"Authorization": basic(user, USERS[user])} if user else {}
    status, _, body = call(f"{base}/auth/token?{urllib.parse.urlencode(query)}", headers=headers)
    assert status == 200, body
    return json.loads(body)


@pytest.fixture
def auth_files(tmp_path):
    return (write_htpasswd(tmp_path / "htpasswd", USERS),
            write_policy(tmp_path / "policy.yml", EXAMPLE_POLICY))


def serve_token(tmp_path, auth_files, *, workers: int | None = None, env: dict | None = None,
                extra: tuple[str, ...] = ()):
    htpasswd, policy = auth_files
    return launch_dockyard(tmp_path / "storage", workers=workers, env=env,
                           extra_args=["--auth", "token", "--htpasswd", str(htpasswd),
                                       "--policy", str(policy), *extra])


def test_the_signing_key_is_made_once_and_shared_by_workers_and_restarts(tmp_path, auth_files):
    server = serve_token(tmp_path, auth_files, workers=2)
    try:
        base = server.url
        token = get_token(base, "reader", "repository:team-a/app:pull")["token"]
        key_file = tmp_path / "storage" / "auth" / "signing-key.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        # connections spread over both workers: every one verifies the token
        for _ in range(20):
            status, _, _ = call(f"{base}/v2/", headers={"Authorization": f"Bearer {token}"})
            assert status == 200
        # every worker issues with the same key
        kids = {json.loads(base64.urlsafe_b64decode(get_token(base, "reader")["token"].split(".")[0] + "=="))["kid"]
                for _ in range(10)}
        assert len(kids) == 1
        _, _, jwks = call(f"{base}/auth/jwks")
        assert [k["kid"] for k in json.loads(jwks)["keys"]] == list(kids)
        before = key_file.read_bytes()
    finally:
        server.stop()
    server = serve_token(tmp_path, auth_files)
    try:
        assert key_file.read_bytes() == before
        status, _, _ = call(f"{server.url}/v2/", headers={"Authorization": f"Bearer {token}"})
        assert status == 200, "a token issued before the restart stopped working"
    finally:
        server.stop()


def test_sighup_rereads_the_policy_in_every_worker(tmp_path, auth_files):
    server = serve_token(tmp_path, auth_files, workers=2, env={"DOCKYARD_AUTH_RELOAD_INTERVAL": "0"})
    try:
        base = server.url
        token = get_token(base, "builder", "repository:team-a/app:pull,push")["token"]
        auth = {"Authorization": f"Bearer {token}"}
        statuses = {call(f"{base}/v2/team-a/app/blobs/uploads/", "POST", auth, b"")[0] for _ in range(10)}
        assert statuses == {202}
        policy = json.loads(json.dumps(EXAMPLE_POLICY))
        policy["groups"]["devs"] = ["deployer"]
        write_policy(auth_files[1], policy)
        time.sleep(0.3)
        # reload_interval 0: nothing changes until the signal
        assert call(f"{base}/v2/team-a/app/blobs/uploads/", "POST", auth, b"")[0] == 202
        os.kill(server.server.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            statuses = {call(f"{base}/v2/team-a/app/blobs/uploads/", "POST", auth, b"")[0] for _ in range(10)}
            if statuses == {403}:
                break
            time.sleep(0.1)
        assert statuses == {403}, statuses
        assert server.server.running(), "SIGHUP stopped the server"
    finally:
        server.stop()


@pytest.mark.parametrize("problem, message", [
    ("sha", "htpasswd"),
    ("missing", "htpasswd"),
    ("policy", "policy"),
    ("no-htpasswd", "auth.mode htpasswd needs auth.htpasswd"),
    ("key", "auth.token.key (the signing key)"),
])
def test_unusable_auth_files_stop_the_server_with_one_line(tmp_path, problem, message):
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"reader": "x"})
    policy = write_policy(tmp_path / "policy.yml", EXAMPLE_POLICY)
    args = ["--auth", "token", "--htpasswd", str(htpasswd), "--policy", str(policy)]
    env = {}
    if problem == "sha":
        htpasswd.write_text("reader:{SHA}qvTGHdzF6KLavt4PO0gs2a6pQ00=\n")
    elif problem == "missing":
        htpasswd.unlink()
    elif problem == "policy":
        policy.write_text("rules:\n  - repositories: [a]\n    users: [x]\n    actions: [fly]\n")
    elif problem == "no-htpasswd":
        args = ["--auth", "htpasswd"]
    elif problem == "key":
        (tmp_path / "bad.pem").write_text("not a key\n")
        env["DOCKYARD_AUTH_TOKEN_KEY"] = str(tmp_path / "bad.pem")
    argv = [*dockyard_command(), "serve", "--port", "0", "--storage", str(tmp_path / "s"), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert "qvTGHdzF6KLavt4PO0gs2a6pQ00" not in proc.stderr


def test_no_secret_reaches_a_log_line(tmp_path, auth_files):
    """A whole authenticated session at debug level with the access log on:
    no password, Basic header, token, refresh token or key material in it."""
    server = serve_token(tmp_path, auth_files, extra=("--log-level", "debug", "--access-log"))
    secrets = [*USERS.values(), *(basic(u, p).split()[1] for u, p in USERS.items())]
    try:
        base = server.url
        pulled = get_token(base, "builder", "repository:team-a/app:pull,push", offline=True)
        secrets += [pulled["token"], pulled["refresh_token"]]
        form = urllib.parse.urlencode({"grant_type": "password", "username": "deployer",
                                       "password": USERS["deployer"], "service": "dockyard",
                                       "access_type": "offline", "client_id": "t",
                                       "scope": "repository:team-a/app:delete"}).encode()
        status, _, body = call(f"{base}/auth/token", "POST",
                               {"Content-Type": "application/x-www-form-urlencoded"}, form)
        assert status == 200
        posted = json.loads(body)
        secrets += [posted["access_token"], posted["refresh_token"]]
        refresh = urllib.parse.urlencode({"grant_type": "refresh_token", "service": "dockyard",
                                          "refresh_token": posted["refresh_token"],
                                          "scope": "repository:team-a/app:pull"}).encode()
        status, _, body = call(f"{base}/auth/token", "POST",
                               {"Content-Type": "application/x-www-form-urlencoded"}, refresh)
        assert status == 200
        secrets.append(json.loads(body)["access_token"])
        bad = urllib.parse.urlencode({"grant_type": "password", "username": "reader",
                                      "password": "wrong-guess-xyz", "service": "dockyard"}).encode()
        assert call(f"{base}/auth/token", "POST", {"Content-Type": "application/x-www-form-urlencoded"},
                    bad)[0] == 401
        secrets.append("wrong-guess-xyz")
        auth = {"Authorization": f"Bearer {pulled['token']}"}
        data = b"a layer"
        status, _, _ = call(f"{base}/v2/team-a/app/blobs/uploads/?digest={sha256_digest(data)}", "POST",
                            auth, data)
        assert status == 201
        assert call(f"{base}/v2/team-a/app/blobs/{sha256_digest(data)}", headers=auth)[0] == 200
        tampered = pulled["token"][:-4] + "AAAA"
        secrets.append(tampered)
        assert call(f"{base}/v2/team-a/app/blobs/{sha256_digest(data)}",
                    headers={"Authorization": f"Bearer {tampered}"})[0] == 401
        assert claims_of(pulled["token"])["sub"] == "builder"
    finally:
        server.stop()
    log = server.log()
    assert "GET /auth/token" in log and "POST /auth/token" in log, "the access log did not run"
    key_lines = [line for line in (tmp_path / "storage" / "auth" / "signing-key.pem").read_text().splitlines()
                 if line and not line.startswith("-----")]
    for secret in [*secrets, *key_lines]:
        for part in {secret, secret[:24]} if len(secret) > 30 else {secret}:
            assert part not in log, f"a secret ({part[:6]}...) is in the log"
