"""Token auth proven with real clients, over TLS they verify.

One Dockyard for the module (tests.support.secure_registry): HTTPS with a
throwaway CA, on ::1 under a host name of its own, because dockerd counts
127.0.0.0/8 as insecure and would skip verification there; `--auth token`
with the built-in token service and the policy of the auth issue
(tests.support.auth.EXAMPLE_POLICY):

    reader                     pulls team-a/app
    builder, deployer (devs)   pull, push, delete team-a/**; push public/**
    anonymous                  pulls public/**
    outsider                   nothing

Each client first shows it refuses the server without the CA (so TLS is
verified, not skipped), then logs in, pushes and pulls; what it did is
checked against what the registry serves (digests, bytes, tags), read
through the token flow.
"""

from __future__ import annotations

import gzip
import http.client
import ipaddress
import json
import re
import ssl
import urllib.error
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.auth import EXAMPLE_POLICY, USERS, access_of, claims_of
from tests.support.content import OCI_LAYER_GZIP, LayoutImage, sha256_digest, write_oci_layout
from tests.support.peers import build_busybox_image, busybox_layer, require_module, run
from tests.support.secure_registry import (DockerClient, SecureRegistry, docker_client, resolved_addresses,
                                           secure_dockyard)

pytestmark = pytest.mark.interop

APP = "team-a/app"              # reader may pull it, the devs push it
PUBLIC = "public/busybox"       # anonymous may pull it, the devs push it
CERT_UNKNOWN = "certificate signed by unknown authority"
DENIED = "requested access to the resource is denied"


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def said(proc) -> str:
    """Everything a command printed."""
    return proc.stdout + proc.stderr


# ---- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secure(tmp_path_factory) -> SecureRegistry:
    with secure_dockyard(tmp_path_factory.mktemp("secure-dockyard"), users=USERS,
                         policy=EXAMPLE_POLICY) as registry:
        yield registry


@pytest.fixture(scope="module")
def docker_cli(dockerd, secure, tmp_path_factory) -> DockerClient:
    """docker on the session's daemon, with a config.json of its own."""
    client = docker_client(dockerd, tmp_path_factory.mktemp("docker-client-config"))
    yield client
    client.logout(secure.host, check=False)


@pytest.fixture(scope="module")
def built(docker_cli) -> tuple[str, str]:
    """(local tag, the line /hello.txt holds) of a busybox image docker built."""
    line = f"built-{uuid.uuid4().hex[:12]}"
    tag = f"dockyard-auth-local/busybox:{uuid.uuid4().hex[:8]}"
    build_busybox_image(docker_cli, tag, run_step=f"echo {line} > /hello.txt")
    return tag, line


def runnable_layer(hello: str) -> bytes:
    """A gzip layer with a static busybox, /bin/sh and /bin/cat, and /hello.txt."""
    return busybox_layer(("sh", "cat"), {"hello.txt": f"{hello}\n".encode()})


@dataclass(frozen=True)
class Seed:
    """An image a dev pushed (skopeo --dest-creds) to APP:seed and PUBLIC:seed."""
    hello: str
    image: LayoutImage
    config_digest: str
    diff_ids: list[str]

    @property
    def digest(self) -> str:
        return self.image.digest


@pytest.fixture(scope="module")
def seed(secure, skopeo, tmp_path_factory) -> Seed:
    hello = f"seed-{uuid.uuid4().hex[:12]}"
    layer = runnable_layer(hello)
    image = write_oci_layout(tmp_path_factory.mktemp("seed") / "layout", [layer],
                             layer_media_type=OCI_LAYER_GZIP, tag="seed")
    for repo in (APP, PUBLIC):
        skopeo.run("copy", "--preserve-digests", "--dest-cert-dir", str(secure.cert_dir),
                   "--dest-creds", secure.creds("builder"), image.ref, f"docker://{secure.host}/{repo}:seed")
        served, manifest = secure.manifest(repo, "seed", user="builder")
        assert served == image.digest
    return Seed(hello, image, manifest["config"]["digest"], [sha256_digest(gzip.decompress(layer))])


# ---- TLS is verified, not skipped --------------------------------------------------------

def test_docker_verifies_the_registry_certificate(secure, docker_cli):
    # the name is ::1 alone, and ::1 is in none of the daemon's insecure ranges
    assert resolved_addresses(secure.name) == {"::1"}
    registry_config = json.loads(docker_cli.run("info", "--format", "{{json .RegistryConfig}}").stdout)
    insecure = [ipaddress.ip_network(net) for net in registry_config["InsecureRegistryCIDRs"] or []]
    assert not any(ipaddress.ip_address("::1") in net for net in insecure), insecure
    assert secure.host not in (registry_config.get("IndexConfigs") or {})
    # nothing answers plain HTTP there, so docker has nothing to fall back to
    with pytest.raises((OSError, http.client.HTTPException)):
        secure.raw_request("GET", f"http://{secure.host}/v2/", timeout=10)

    with secure.docker_ca.withheld():
        refused = docker_cli.login(secure.host, "builder", USERS["builder"], check=False)
    assert refused.returncode != 0
    assert CERT_UNKNOWN in said(refused), said(refused)
    assert docker_cli.auth_entry(secure.host) is None

    # the same login with the CA back in /etc/docker/certs.d/HOST:PORT/ works
    accepted = docker_cli.login(secure.host, "builder", USERS["builder"])
    assert "Login Succeeded" in accepted.stdout
    docker_cli.logout(secure.host)


def test_python_client_verifies_and_gets_the_bearer_challenge(secure):
    with pytest.raises(urllib.error.URLError) as refused:
        secure.raw_request("GET", f"{secure.url}/v2/", context=ssl.create_default_context(), timeout=10)
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError), refused.value

    challenge = secure.raw_request("GET", f"{secure.url}/v2/{APP}/tags/list")
    assert challenge.status == 401
    header = challenge.headers["WWW-Authenticate"]
    assert header.startswith("Bearer "), header
    assert f'realm="{secure.realm}"' in header and 'service="dockyard"' in header, header
    assert f'scope="repository:{APP}:pull' in header, header


# ---- docker ------------------------------------------------------------------------------

def test_docker_login_push_pull_run_logout(secure, docker_cli, built):
    local, hello = built
    repo = unique("team-a/docker")
    ref = f"{secure.host}/{repo}:1"

    logged_in = docker_cli.login(secure.host, "builder", USERS["builder"])
    try:
        assert "Login Succeeded" in logged_in.stdout
        entry = docker_cli.auth_entry(secure.host)
        # offline_token=true: docker keeps the refresh (identity) token, not the password
        assert entry and entry.get("identitytoken"), docker_cli.config()
        assert claims_of(entry["identitytoken"])["sub"] == "builder"
        assert USERS["builder"] not in docker_cli.config_path.read_text()

        docker_cli.run("tag", local, ref)
        pushed = docker_cli.run("push", ref)
        match = re.search(r"digest: (sha256:[0-9a-f]{64})", pushed.stdout)
        assert match, said(pushed)
        digest, manifest = secure.manifest(repo, "1", user="deployer")
        assert digest == match.group(1)
        assert len(manifest["layers"]) == 3    # COPY busybox, RUN --install, RUN echo
        assert secure.tags(repo, user="deployer") == ["1"]

        # forget the local copies, pull it back (through the identity token) and run it
        docker_cli.run("rmi", ref)
        docker_cli.run("pull", ref)
        repo_digests = json.loads(docker_cli.run("image", "inspect", "-f", "{{json .RepoDigests}}", ref).stdout)
        assert f"{secure.host}/{repo}@{digest}" in repo_digests
        out = docker_cli.run("run", "--rm", "--network", "none", ref, "cat", "/hello.txt")
        assert out.stdout.strip() == hello
    finally:
        logged_out = docker_cli.logout(secure.host)
    assert secure.host in logged_out.stdout      # "Removing login credentials for HOST"
    assert docker_cli.auth_entry(secure.host) is None
    assert "identitytoken" not in docker_cli.config_path.read_text()

    # logged out, team-a/ is closed again
    docker_cli.run("rmi", ref)
    anonymous = docker_cli.run("pull", ref, check=False)
    assert anonymous.returncode != 0
    assert "pull access denied" in said(anonymous), said(anonymous)


def test_docker_pull_only_user_may_pull_but_not_push(secure, docker_cli, seed, built):
    local, _ = built
    seeded = f"{secure.host}/{APP}:seed"
    docker_cli.login(secure.host, "reader", USERS["reader"])
    try:
        docker_cli.run("pull", seeded)
        out = docker_cli.run("run", "--rm", "--network", "none", seeded, "cat", "/hello.txt")
        assert out.stdout.strip() == seed.hello

        # a tag of what it pulled (its blobs are all there: only the manifest PUT is left)
        retag = f"{secure.host}/{APP}:by-reader"
        docker_cli.run("tag", seeded, retag)
        refused = docker_cli.run("push", retag, check=False)
        assert refused.returncode != 0
        assert f"denied: {DENIED}" in said(refused), said(refused)

        # an image of its own (new blobs: the upload is refused)
        built_ref = f"{secure.host}/{APP}:reader-built"
        docker_cli.run("tag", local, built_ref)
        refused = docker_cli.run("push", built_ref, check=False)
        assert refused.returncode != 0
        assert f"denied: {DENIED}" in said(refused), said(refused)
    finally:
        docker_cli.logout(secure.host)
    assert secure.tags(APP, user="builder") == ["seed"]

    # what docker got: 403 DENIED (the caller is known; the policy says no)
    upload = secure.request("POST", f"/v2/{APP}/blobs/uploads/", user="reader",
                            scopes=[f"repository:{APP}:pull,push"], body=b"")
    assert upload.status == 403, (upload.status, upload.body[:300])
    error = upload.json()["errors"][0]
    assert (error["code"], error["message"]) == ("DENIED", DENIED), error


def test_docker_login_with_a_wrong_password_fails(secure, docker_cli):
    refused = docker_cli.login(secure.host, "builder", "not-" + USERS["builder"], check=False)
    assert refused.returncode != 0
    assert "unauthorized: incorrect username or password" in said(refused), said(refused)
    assert "Login Succeeded" not in said(refused)
    assert docker_cli.auth_entry(secure.host) is None

    unknown = docker_cli.login(secure.host, "nobody", "whatever", check=False)
    assert unknown.returncode != 0
    assert "unauthorized: incorrect username or password" in said(unknown), said(unknown)
    assert docker_cli.auth_entry(secure.host) is None


def test_anonymous_pull_of_public_works_and_anonymous_push_is_refused(secure, docker_cli, skopeo, seed, built):
    local, _ = built
    assert docker_cli.auth_entry(secure.host) is None       # nobody is logged in
    public = f"{secure.host}/{PUBLIC}:seed"
    docker_cli.run("pull", public)
    repo_digests = json.loads(docker_cli.run("image", "inspect", "-f", "{{json .RepoDigests}}", public).stdout)
    assert f"{secure.host}/{PUBLIC}@{seed.digest}" in repo_digests
    out = docker_cli.run("run", "--rm", "--network", "none", public, "cat", "/hello.txt")
    assert out.stdout.strip() == seed.hello
    inspected = skopeo.run("inspect", "--no-creds", "--cert-dir", str(secure.cert_dir), f"docker://{public}")
    assert json.loads(inspected.stdout)["Digest"] == seed.digest

    # what anonymous pulls is public/ alone
    closed = skopeo.run("inspect", "--no-creds", "--cert-dir", str(secure.cert_dir),
                        f"docker://{secure.host}/{APP}:seed", check=False)
    assert closed.returncode != 0
    assert "unauthorized: authentication required" in closed.stderr, closed.stderr

    # and anonymous pushes nothing, not even into public/: a 401 and a new
    # challenge (other credentials would help), not a 403
    repo = unique("public/anonymous")
    target = f"{secure.host}/{repo}:1"
    upload = secure.request("POST", f"/v2/{repo}/blobs/uploads/", user=None,
                            scopes=[f"repository:{repo}:pull,push"], body=b"")
    assert upload.status == 401, (upload.status, upload.body[:300])
    assert upload.json()["errors"][0]["code"] == "UNAUTHORIZED"
    challenge = upload.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and f'scope="repository:{repo}:pull,push"' in challenge, challenge
    docker_cli.run("tag", local, target)
    refused = docker_cli.run("push", target, check=False)
    assert refused.returncode != 0
    # docker words a 401 whose challenge says error="insufficient_scope" as "denied"
    assert DENIED in said(refused) or "unauthorized" in said(refused).lower(), said(refused)
    assert "Pushed" not in refused.stdout and "digest: sha256:" not in refused.stdout, refused.stdout
    refused = skopeo.run("copy", "--dest-no-creds", "--dest-cert-dir", str(secure.cert_dir),
                         seed.image.ref, f"docker://{target}", check=False)
    assert refused.returncode != 0
    assert "unauthorized: authentication required" in refused.stderr, refused.stderr
    assert secure.tags(repo, user="builder") == []


# ---- podman ------------------------------------------------------------------------------

def podman_login(podman, *args: str, password: str, check: bool = True):
    """podman login with the password on stdin, into the helper's own auth file."""
    return run([*podman.base_args(), "login", "--password-stdin", *args], input=password.encode(),
               env={"REGISTRY_AUTH_FILE": str(podman.root.parent / "auth.json")}, check=check, timeout=120)


def test_podman_login_push_pull(secure, podman, seed, tmp_path):
    auth_file = podman.root.parent / "auth.json"
    empty = tmp_path / "no-ca"
    empty.mkdir()
    refused = podman_login(podman, "--cert-dir", str(empty), "--username", "deployer", secure.host,
                           password=USERS["deployer"], check=False)
    assert refused.returncode != 0
    assert CERT_UNKNOWN in said(refused), said(refused)

    certs = ("--cert-dir", str(secure.cert_dir))
    logged_in = podman_login(podman, *certs, "--username", "deployer", secure.host, password=USERS["deployer"])
    assert "Login Succeeded" in logged_in.stdout
    assert secure.host in json.loads(auth_file.read_text())["auths"]
    policy = ("--signature-policy", str(podman.policy))
    try:
        seeded = f"{secure.host}/{APP}:seed"
        podman.run("pull", *certs, *policy, seeded)
        image_id = podman.run("image", "inspect", "--format", "{{.Id}}", seeded).stdout.strip()
        assert f"sha256:{image_id}" == seed.config_digest

        repo = unique("team-a/podman")
        podman.run("push", *certs, *policy, seeded, f"docker://{secure.host}/{repo}:1")
        _, manifest = secure.manifest(repo, "1", user="builder")
        config = json.loads(secure.blob(repo, manifest["config"]["digest"], user="builder"))
        assert config["rootfs"]["diff_ids"] == seed.diff_ids
        layer = secure.blob(repo, manifest["layers"][0]["digest"], user="builder")
        assert sha256_digest(gzip.decompress(layer)) == seed.diff_ids[0]
    finally:
        podman.run("logout", secure.host)
    assert secure.host not in (json.loads(auth_file.read_text()).get("auths") or {})

    anonymous = podman.run("pull", *certs, *policy, f"{secure.host}/{repo}:1", check=False)
    assert anonymous.returncode != 0
    assert "unauthorized: authentication required" in anonymous.stderr, anonymous.stderr


# ---- skopeo ------------------------------------------------------------------------------

def test_skopeo_copy_and_inspect_with_credentials(secure, skopeo, tmp_path):
    image = write_oci_layout(tmp_path / "src", layer_sizes=[200_000, 3_000])
    repo = unique("team-a/skopeo")
    remote = f"docker://{secure.host}/{repo}:1"
    empty = tmp_path / "no-ca"
    empty.mkdir()

    refused = skopeo.run("copy", "--preserve-digests", "--dest-cert-dir", str(empty),
                         "--dest-creds", secure.creds("deployer"), image.ref, remote, check=False)
    assert refused.returncode != 0
    assert CERT_UNKNOWN in refused.stderr, refused.stderr

    skopeo.run("copy", "--preserve-digests", "--dest-cert-dir", str(secure.cert_dir),
               "--dest-creds", secure.creds("deployer"), image.ref, remote)
    info = json.loads(skopeo.run("inspect", "--cert-dir", str(secure.cert_dir),
                                 "--creds", secure.creds("builder"), remote).stdout)
    assert info["Digest"] == image.digest
    assert info["Layers"] == list(image.layers)
    assert secure.manifest(repo, "1", user="builder")[0] == image.digest

    skopeo.run("copy", "--src-cert-dir", str(secure.cert_dir), "--src-creds", secure.creds("builder"),
               remote, f"oci:{tmp_path / 'back'}:1", "--dest-oci-accept-uncompressed-layers")
    for layer in image.layers:
        name = layer.split(":", 1)[1]
        assert (tmp_path / "back" / "blobs" / "sha256" / name).read_bytes() == \
            (tmp_path / "src" / "blobs" / "sha256" / name).read_bytes()

    wrong = skopeo.run("inspect", "--cert-dir", str(secure.cert_dir), "--creds", "builder:wrong", remote,
                       check=False)
    assert wrong.returncode != 0
    assert "incorrect username or password" in wrong.stderr, wrong.stderr
    # a known user the policy gives nothing: 403 DENIED alone, no new challenge
    outsider = skopeo.run("inspect", "--cert-dir", str(secure.cert_dir), "--creds", secure.creds("outsider"),
                          remote, check=False)
    assert outsider.returncode != 0
    assert f"denied: {DENIED}" in outsider.stderr, outsider.stderr
    assert "authentication required" not in outsider.stderr, outsider.stderr


# ---- containerd ----------------------------------------------------------------------------

def test_ctr_pull_with_user(secure, dockerd, seed):
    ref = f"{secure.host}/{APP}:seed"
    without_ca = dockerd.ctr("images", "pull", "--user", secure.creds("reader"), ref, check=False)
    assert without_ca.returncode != 0
    assert CERT_UNKNOWN in said(without_ca), said(without_ca)

    hosts = ("--hosts-dir", str(secure.hosts_dir))     # HOST:PORT/ca.crt, as /etc/containerd/certs.d
    anonymous = dockerd.ctr("images", "pull", *hosts, ref, check=False)
    assert anonymous.returncode != 0
    assert "pull access denied" in said(anonymous), said(anonymous)

    dockerd.ctr("images", "pull", *hosts, "--user", secure.creds("reader"), ref)
    try:
        listed = dockerd.ctr("images", "ls").stdout
        line = next((l for l in listed.splitlines() if l.startswith(ref + " ")), None)
        assert line is not None, listed
        assert seed.digest in line.split()
    finally:
        dockerd.ctr("images", "rm", ref, check=False)


# ---- ORAS (oras-py) --------------------------------------------------------------------------

def test_oras_push_and_pull_artifact_with_credentials(secure, tmp_path, monkeypatch):
    oras_client = require_module("oras.client")
    oras_auth_utils = require_module("oras.auth.utils")
    requests = require_module("requests")
    repo = unique("team-a/oras")
    target = f"{secure.host}/{repo}:v1"
    payload = tmp_path / "sbom.json"
    payload.write_bytes(json.dumps({"packages": ["busybox"], "nonce": uuid.uuid4().hex}).encode())
    files = ["sbom.json:application/vnd.example.sbom.v1+json"]
    monkeypatch.chdir(tmp_path)        # oras-py names layers by the path it is given

    untrusting = oras_client.OrasClient(hostname=secure.host)      # the system's CAs only
    untrusting.auth.set_basic_auth("deployer", USERS["deployer"])
    with pytest.raises(requests.exceptions.SSLError, match="certificate verify failed"):
        untrusting.push(target=target, files=files, quiet=True)

    pusher = oras_client.OrasClient(hostname=secure.host, tls_verify=str(secure.ca_cert))
    pusher.auth.set_basic_auth("deployer", USERS["deployer"])
    # oras-py keeps the first token it gets (its HEAD of the blob asks for
    # pull) and, on the 401 insufficient_scope of the upload that follows,
    # sends it again instead of asking for more: it fails so against CNCF
    # Distribution too. Its own token request, with the push scope up
    # front (what oras-go callers do with AppendRepositoryScope):
    pusher.auth.set_token_auth(pusher.auth.request_token(oras_auth_utils.parse_auth_header(
        f'Bearer realm="{secure.realm}",service="dockyard",scope="repository:{repo}:pull,push"')))
    assert access_of(pusher.auth.token)[("repository", repo)] >= {"pull", "push"}
    pushed = pusher.push(target=target, files=files, quiet=True)
    assert pushed.status_code == 201
    digest, manifest = secure.manifest(repo, "v1", user="builder")
    assert pushed.headers.get("Docker-Content-Digest") == digest
    assert [layer["digest"] for layer in manifest["layers"]] == [sha256_digest(payload.read_bytes())]

    puller = oras_client.OrasClient(hostname=secure.host, tls_verify=str(secure.ca_cert))
    puller.auth.set_basic_auth("builder", USERS["builder"])
    pulled = puller.pull(target=target, outdir=str(tmp_path / "out"))
    assert [Path(f).read_bytes() for f in pulled] == [payload.read_bytes()]

    anonymous = oras_client.OrasClient(hostname=secure.host, tls_verify=str(secure.ca_cert))
    with pytest.raises(Exception) as refused:
        anonymous.pull(target=target, outdir=str(tmp_path / "anon"))
    assert not isinstance(refused.value, requests.exceptions.SSLError), refused.value
    assert "401" in str(refused.value) or "Unauthorized" in str(refused.value), refused.value
    assert not (tmp_path / "anon" / "sbom.json").exists()
