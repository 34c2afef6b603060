"""A hostile registry on loopback: descriptors that cannot bound a download,
malformed JSON, bad token answers, redirects off HTTP, huge indexes, huge
configs and cleartext token realms on other hosts. Each is refused with one
line (or survived), before anything is downloaded, and leaves nothing in the
store."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest
from aiohttp import web

import puller
import puller.store.ingest
from puller.client.auth import AuthError, Credentials
from puller.client.http import (MANIFEST_REQUESTS_PER_REGISTRY, ClientOptions, DigestMismatchError, ManifestError,
                         RegistryResponseError)
from puller.oci import MAX_DOCUMENT_SIZE, ContentError
from puller.transfer.pull import pull
from puller.store import LocalStore

from tests.client.fakeregistry import (OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, FakeRegistry, digest,
                                       start_app)

# the checkout the imported `puller` comes from (the CLI runs the same code)
PULLER_ROOT = Path(puller.__file__).resolve().parents[1]
OPTIONS = ClientOptions(retries=3, docker_config="/nonexistent-dockyard")
ALICE = Credentials("alice", "s3cret")


def leftovers(store: LocalStore, *manifests: dict) -> list[str]:
    """What a pull left in ingest/ and blobs/, but for the (complete,
    verified) blobs of `manifests` and the store's own index lock file."""
    out = []
    keep = {m["digest"][7:] for m in manifests} | {".index.lock"}
    for folder in ("ingest", "blobs/sha256"):
        path = store.root / folder
        if path.is_dir():
            out += [f"{folder}/{p.name}" for p in path.iterdir() if p.name not in keep]
    return out


async def run_cli(*args: str, env: dict | None = None, timeout: float = 60):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "puller", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(PULLER_ROOT), "DOCKER_CONFIG": "/nonexistent-dockyard", **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("dockyard: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def image(fake: FakeRegistry, repo: str, tag: str, *, layer: bytes = b"layer bytes", config_patch=None,
          layer_patch=None, annotations: dict | None = None) -> dict:
    """An image whose config and layer descriptors can be tampered with."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [digest(layer)]}}).encode()
    config_desc = {"mediaType": OCI_CONFIG, **fake.add_blob(config)}
    layer_desc = {"mediaType": OCI_LAYER, **fake.add_blob(layer)}
    if config_patch:
        config_patch(config_desc)
    if layer_patch:
        layer_patch(layer_desc)
    body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc, "layers": [layer_desc]}
    if annotations:
        body["annotations"] = annotations
    data = json.dumps(body).encode()
    fake.manifests[(repo, tag)] = fake.manifests[(repo, digest(data))] = (data, OCI_MANIFEST)
    return {"mediaType": OCI_MANIFEST, "digest": digest(data), "size": len(data),
            "platform": {"os": "linux", "architecture": "amd64"}}


def raw_manifest(fake: FakeRegistry, repo: str, tag: str, body: bytes, media_type: str = OCI_MANIFEST) -> None:
    fake.manifests[(repo, tag)] = fake.manifests[(repo, digest(body))] = (body, media_type)


def set_size(value):
    def patch(desc: dict) -> None:
        if value is _MISSING:
            del desc["size"]
        else:
            desc["size"] = value
    return patch


_MISSING = object()
BAD_SIZES = [-1, _MISSING, 1.5, 1e3, "12", True, 2 ** 63, 10 ** 30]
BAD_SIZE_IDS = ["negative", "missing", "float", "integral-float", "string", "bool", "2^63", "huge"]


# -- 11: a size that cannot bound a download ----------------------------------------------

@pytest.mark.parametrize("size", BAD_SIZES, ids=BAD_SIZE_IDS)
@pytest.mark.parametrize("which", ["layer", "config"])
async def test_bad_blob_size_refused_before_any_download(fake, tmp_path, which, size):
    patch = {"layer_patch": set_size(size)} if which == "layer" else {"config_patch": set_size(size)}
    image(fake, "app/size", "v1", layer=os.urandom(64 * 1024), **patch)
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ContentError, match=rf"{which}.*(no size|size must be an integer from 0 to 2\^63-1)"):
        await pull(f"{fake.host}/app/size:v1", store=store, options=OPTIONS)
    assert fake.count("GET", "/blobs/") == 0, "a blob was requested"
    assert leftovers(store) == []
    assert store.resolve(f"{fake.host}/app/size:v1") is None


@pytest.mark.parametrize("size", [-1, _MISSING, "300", 2 ** 63], ids=["negative", "missing", "string", "2^63"])
async def test_bad_index_entry_size_refused_before_fetching_the_child(fake, tmp_path, size):
    child = image(fake, "app/idx", "child")
    set_size(size)(child)
    fake.add_index("app/idx", "v1", [child])
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ContentError, match=r"manifests\[0\]: (no size|size must be an integer)"):
        await pull(f"{fake.host}/app/idx:v1", store=store, platform="linux/amd64", options=OPTIONS)
    assert fake.count("GET", f"/manifests/{child['digest']}") == 0 and fake.count("GET", "/blobs/") == 0
    assert leftovers(store) == []


async def test_cli_bad_size_is_one_line_and_leaves_nothing(fake, tmp_path):
    image(fake, "app/cli-size", "v1", layer=os.urandom(256 * 1024), layer_patch=set_size(-1))
    code, _, err = await run_cli("pull", "--store", str(tmp_path / "s"), f"{fake.host}/app/cli-size:v1")
    assert_one_line(code, err, "layers[0]", "size must be an integer")
    assert fake.count("GET", "/blobs/") == 0
    assert leftovers(LocalStore(tmp_path / "s")) == []


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_blob_longer_than_its_size_is_cut_off_at_the_size(fake, tmp_path, monkeypatch, framing):
    # 3 MiB + a tail: with or without a Content-Length announcing it, not one
    # byte past the declared size reaches the staged file
    layer = os.urandom(3 * 1024 * 1024)
    image(fake, "app/long", "v1", layer=layer)
    fake.oversize.add(digest(layer))
    if framing == "chunked":
        fake.chunked.add(digest(layer))
    written: dict[str, int] = {}
    real = puller.store.ingest._write_and_hash

    def spy(handle, hasher, parts):
        real(handle, hasher, parts)
        written[handle.name] = max(written.get(handle.name, 0), handle.tell())
    monkeypatch.setattr(puller.store.ingest, "_write_and_hash", spy)
    store = LocalStore(tmp_path / "store")
    with pytest.raises(DigestMismatchError, match="more than"):
        await pull(f"{fake.host}/app/long:v1", store=store, options=OPTIONS)
    layer_files = [size for name, size in written.items() if digest(layer)[7:] in name]
    assert all(size <= len(layer) for size in layer_files), written
    assert not store.has_blob(digest(layer))
    assert [p for p in leftovers(store) if digest(layer)[7:] in p] == []


# -- 12: malformed JSON is one line, never a traceback -----------------------------------

@pytest.mark.parametrize("case", ["entries-not-objects", "layer-without-digest", "platform-not-object",
                                  "layers-not-a-list", "nan"])
async def test_malformed_manifests_are_one_line(fake, tmp_path, case):
    good_layer = {"mediaType": OCI_LAYER, **fake.add_blob(b"x")}
    config = {"mediaType": OCI_CONFIG, **fake.add_blob(b"{}")}
    if case == "entries-not-objects":
        body, media_type, expected = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                 "manifests": ["sha256:" + "a" * 64, 7]}), OCI_INDEX, "manifests[0]"
    elif case == "platform-not-object":
        child = image(fake, "app/bad", "child")
        child["platform"] = "linux/amd64"
        body, media_type, expected = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                 "manifests": [child]}), OCI_INDEX, "platform must be an object"
    else:
        layers = {"layer-without-digest": [{"mediaType": OCI_LAYER, "size": 1}],
                  "layers-not-a-list": good_layer, "nan": [good_layer]}[case]
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers})
        if case == "nan":
            body = body.replace('"size": 1', '"size": NaN')
        media_type = OCI_MANIFEST
        expected = {"layer-without-digest": "layers[0]: no digest", "layers-not-a-list": "layers must be a list",
                    "nan": "not valid JSON"}[case]
    raw_manifest(fake, "app/bad", "v1", body.encode(), media_type)
    store = tmp_path / "s"
    code, _, err = await run_cli("pull", "--store", str(store), "--platform", "linux/amd64", f"{fake.host}/app/bad:v1")
    assert_one_line(code, err, expected)
    assert fake.count("GET", "/blobs/") == 0
    assert leftovers(LocalStore(store)) == []


class TokenServer:
    """A token realm answering whatever body it is given (raw text)."""

    def __init__(self, body: str = '{"token": "good-token"}'):
        self.body = body
        self.calls: list[dict] = []
        self.redirect_to: str | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        form = dict(await request.post()) if request.method == "POST" else {}
        self.calls.append({"method": request.method, "form": form,
                           "authorization": request.headers.get("Authorization")})
        if self.redirect_to:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        return web.Response(body=self.body.encode(), content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/token", self.handle)
        return app


@pytest.fixture
async def token_server():
    tokens = TokenServer()
    runner, host = await start_app(tokens.app())
    tokens.host = host
    yield tokens
    await runner.cleanup()


@pytest.mark.parametrize("answer, message", [
    ('["good-token"]', "not a JSON object"), ('{"token": 12345}', "not a printable string"),
    ('{"token": null, "access_token": {"a": 1}}', "not a printable string"), ('"just a string"', "not a JSON object"),
    ('{"token": "a", "expires_in": 5', "not JSON")])
async def test_bad_token_answers_are_one_line(fake, token_server, tmp_path, answer, message):
    image(fake, "app/tok", "v1")
    fake.challenge = f'Bearer realm="http://{token_server.host}/token",service="fake"'
    token_server.body = answer
    code, _, err = await run_cli("pull", "--store", str(tmp_path / "s"), f"{fake.host}/app/tok:v1")
    assert_one_line(code, err, "token server", message)
    assert leftovers(LocalStore(tmp_path / "s")) == []


@pytest.mark.parametrize("expires_in", ["Infinity", "-Infinity", "NaN", "-5", "1e400", "9" * 400, '"soon"', "true"])
async def test_odd_token_lifetimes_are_survived(fake, token_server, tmp_path, expires_in):
    image(fake, "app/tok", "v1")
    fake.challenge = f'Bearer realm="http://{token_server.host}/token",service="fake"'
    token_server.body = '{"token": "good-token", "expires_in": %s}' % expires_in
    options = ClientOptions(retries=1, docker_config="/nonexistent-dockyard",
                            credentials=((fake.host, ALICE),))
    result = await pull(f"{fake.host}/app/tok:v1", store=LocalStore(tmp_path / "s"), options=options)
    assert result.layers and token_server.calls
    assert all(r.headers.get("Authorization") == "Bearer good-token" for r in fake.requests if "/v2/app" in r.path)


# -- 13: a redirect off HTTP is permanent ---------------------------------------------------

def assert_not_retried(fake: FakeRegistry) -> None:
    gets = [r.path for r in fake.requests if r.method == "GET" and "/blobs/" in r.path]
    assert gets and len(gets) == len(set(gets)), f"a refused redirect was retried: {gets}"


@pytest.mark.parametrize("target", ["file://", "ftp://127.0.0.1", "gopher://127.0.0.1:70", "javascript:"])
async def test_redirect_to_another_scheme_is_refused_at_once(fake, tmp_path, target):
    desc = image(fake, "app/redir", "v1", layer=os.urandom(10_000))
    fake.redirect_blobs_to = target
    store = LocalStore(tmp_path / "store")
    started = time.monotonic()
    with pytest.raises(RegistryResponseError, match="only http and https URLs are followed"):
        await asyncio.wait_for(pull(f"{fake.host}/app/redir:v1", store=store,
                                    options=ClientOptions(docker_config="/nonexistent-dockyard")), 20)
    assert time.monotonic() - started < 5
    assert_not_retried(fake)
    assert leftovers(store, desc) == []


async def test_cli_redirect_to_file_is_one_line(fake, tmp_path):
    image(fake, "app/redir", "v1")
    fake.redirect_blobs_to = "file://"
    started = time.monotonic()
    code, _, err = await run_cli("pull", "--store", str(tmp_path / "s"), f"{fake.host}/app/redir:v1", timeout=30)
    assert_one_line(code, err, "file:///cdn/", "only http and https")
    assert time.monotonic() - started < 10
    assert_not_retried(fake)


# -- 14: thousands of index children, a bounded number of connections -------------------------

async def test_all_platforms_of_a_huge_index_uses_few_connections(fake, tmp_path):
    children = 2500
    config_body = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest(b"tiny")]}}
    config = {"mediaType": OCI_CONFIG, **fake.add_blob(json.dumps(config_body).encode())}
    layer = {"mediaType": OCI_LAYER, **fake.add_blob(b"tiny")}
    entries = []
    for i in range(children):
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer],
                           "annotations": {"n": str(i)}}).encode()
        fake.manifests[("app/huge", digest(body))] = (body, OCI_MANIFEST)
        entries.append({"mediaType": OCI_MANIFEST, "digest": digest(body), "size": len(body),
                        "platform": {"os": "linux", "architecture": "amd64" if i == 0 else f"arch{i}"}})
    index = fake.add_index("app/huge", "v1", entries)
    store = LocalStore(tmp_path / "store")
    started = time.monotonic()
    result = await asyncio.wait_for(pull(f"{fake.host}/app/huge:v1", store=store, platform="linux/amd64",
                                         all_platforms=True, options=OPTIONS), 120)
    assert result.digest == index["digest"] and len(result.platforms) == children
    assert all(store.has_blob(e["digest"]) for e in entries)
    assert fake.count("GET", "/manifests/") == children + 1
    bound = max(MANIFEST_REQUESTS_PER_REGISTRY, OPTIONS.concurrency)
    assert bound <= 8
    assert 1 <= fake.peak_connections <= bound, f"{fake.peak_connections} connections at once"
    print(f"{children} children in {time.monotonic() - started:.1f}s, peak {fake.peak_connections} connections")


# -- 15: configs are capped like manifests ---------------------------------------------------

async def test_config_declared_over_the_cap_is_refused_before_download(fake, tmp_path):
    image(fake, "app/bigcfg", "v1", config_patch=set_size(MAX_DOCUMENT_SIZE + 1))
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ContentError, match=f"config: declared size {MAX_DOCUMENT_SIZE + 1} bytes exceeds"):
        await pull(f"{fake.host}/app/bigcfg:v1", store=store, options=OPTIONS)
    assert fake.count("GET", "/blobs/") == 0 and leftovers(store) == []


async def test_config_longer_than_declared_is_cut_off(fake, tmp_path):
    desc = image(fake, "app/longcfg", "v1")
    config_digest = json.loads(fake.manifests[("app/longcfg", desc["digest"])][0])["config"]["digest"]
    fake.oversize.add(config_digest)
    fake.chunked.add(config_digest)
    store = LocalStore(tmp_path / "store")
    with pytest.raises(DigestMismatchError, match="more than"):
        await pull(f"{fake.host}/app/longcfg:v1", store=store, options=OPTIONS)
    assert not store.has_blob(config_digest)


async def test_chunked_manifest_over_the_cap_is_cut_off(fake, tmp_path):
    # no Content-Length to refuse up front: the read itself stops past the cap
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": [],
                       "annotations": {"pad": "x" * MAX_DOCUMENT_SIZE}}).encode()
    raw_manifest(fake, "app/chunkedhuge", "v1", body)

    async def streamed(request):
        response = web.StreamResponse(headers={"Content-Type": OCI_MANIFEST})
        await response.prepare(request)
        for start in range(0, len(body), 256 * 1024):
            await response.write(body[start:start + 256 * 1024])
        await response.write_eof()
        return response
    async def base(request):
        return web.json_response({})
    app = web.Application()
    app.router.add_get("/v2/", base)
    app.router.add_get("/v2/app/chunkedhuge/manifests/v1", streamed)
    runner, host = await start_app(app)
    try:
        with pytest.raises(ManifestError, match=f"exceeds the {MAX_DOCUMENT_SIZE} byte limit"):
            await pull(f"{host}/app/chunkedhuge:v1", store=LocalStore(tmp_path / "s"), options=OPTIONS)
    finally:
        await runner.cleanup()


async def test_cli_inspect_remote_config_over_the_cap_is_one_line(fake, tmp_path):
    image(fake, "app/bigcfg", "v1", config_patch=set_size(MAX_DOCUMENT_SIZE * 3))
    code, _, err = await run_cli("inspect", "--remote", f"{fake.host}/app/bigcfg:v1")
    assert_one_line(code, err, "exceeds the 4194304 byte limit")
    assert fake.count("GET", "/blobs/") == 0


def _oci_layout(root: Path, padding: int) -> None:
    """An OCI layout of one small layer whose config carries `padding` bytes of history."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        member = tarfile.TarInfo("hello.txt")
        member.size = 5
        tar.addfile(member, io.BytesIO(b"hello"))
    layer = buffer.getvalue()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
                         "history": [{"comment": "x" * padding}]}).encode()
    store = LocalStore(root)
    store.ensure()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": store.write_blob(config),
                                      "size": len(config)},
                           "layers": [{"mediaType": OCI_LAYER, "digest": store.write_blob(layer),
                                       "size": len(layer)}]}).encode()
    store.record("latest", {"mediaType": OCI_MANIFEST, "digest": store.write_blob(manifest), "size": len(manifest)})


async def test_cli_unpack_refuses_a_config_over_the_cap(tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    _oci_layout(small, 10)
    _oci_layout(big, MAX_DOCUMENT_SIZE)
    code, _, err = await run_cli("unpack", "--no-cache", f"oci:{big}", str(tmp_path / "bundle-big"))
    assert_one_line(code, err, "more than the 4194304 byte limit")
    assert not (tmp_path / "bundle-big" / "rootfs").exists()
    # the same layout with an ordinary config unpacks
    code, _, err = await run_cli("unpack", "--no-cache", f"oci:{small}", str(tmp_path / "bundle-small"))
    assert code == 0, err
    assert (tmp_path / "bundle-small" / "rootfs" / "hello.txt").read_bytes() == b"hello"


# -- 16: cleartext credentials only to the registry's own loopback host ------------------------

@pytest.mark.parametrize("realm_host", ["127.0.0.2", "localhost"])
async def test_plain_http_realm_on_another_host_is_refused(fake, tmp_path, realm_host):
    tokens = TokenServer()
    bind = "127.0.0.2" if realm_host == "127.0.0.2" else "127.0.0.1"
    runner, host = await start_app(tokens.app(), host=bind)
    port = host.rsplit(":", 1)[1]
    try:
        image(fake, "app/realm", "v1")
        fake.challenge = f'Bearer realm="http://{realm_host}:{port}/token",service="fake"'
        options = ClientOptions(docker_config="/nonexistent-dockyard", credentials=((fake.host, ALICE),))
        with pytest.raises(AuthError, match=rf"refusing token realm http://{realm_host}:{port}/token: not HTTPS, "
                                            r"and not the registry's own host 127\.0\.0\.1"):
            await pull(f"{fake.host}/app/realm:v1", store=LocalStore(tmp_path / "s"), options=options)
        assert tokens.calls == [], "the realm was sent a request"
        code, _, err = await run_cli("pull", "--creds", "alice:s3cret", "--store", str(tmp_path / "s"),
                                     f"{fake.host}/app/realm:v1")
        assert_one_line(code, err, "refusing token realm", "not HTTPS", "registry's own host")
        assert tokens.calls == []
    finally:
        await runner.cleanup()


async def test_plain_http_realm_on_the_registry_host_works(fake, token_server, tmp_path):
    # same host (127.0.0.1), another port: a local registry with its token server beside it
    image(fake, "app/realm", "v1")
    fake.challenge = f'Bearer realm="http://{token_server.host}/token",service="fake"'
    options = ClientOptions(docker_config="/nonexistent-dockyard", credentials=((fake.host, ALICE),))
    await pull(f"{fake.host}/app/realm:v1", store=LocalStore(tmp_path / "s"), options=options)
    assert token_server.calls and token_server.calls[0]["form"].get("password") == "s3cret"


@pytest.mark.parametrize("realm", ["file:///etc/passwd", "ftp://127.0.0.1/token", "http:///token"])
async def test_realm_that_is_not_http_is_refused_at_once(fake, tmp_path, realm):
    image(fake, "app/realm", "v1")
    fake.challenge = f'Bearer realm="{realm}",service="fake"'
    started = time.monotonic()
    with pytest.raises(AuthError, match="refusing token realm"):
        await asyncio.wait_for(pull(f"{fake.host}/app/realm:v1", store=LocalStore(tmp_path / "s"),
                                    options=ClientOptions(docker_config="/nonexistent-dockyard",
                                                          credentials=((fake.host, ALICE),))), 20)
    assert time.monotonic() - started < 3


async def test_realm_redirecting_the_password_elsewhere_is_refused(fake, token_server, tmp_path):
    other = TokenServer()
    runner, other_host = await start_app(other.app(), host="127.0.0.2")
    try:
        image(fake, "app/realm", "v1")
        fake.challenge = f'Bearer realm="http://{token_server.host}/token",service="fake"'
        token_server.redirect_to = f"http://{other_host}/token"
        options = ClientOptions(docker_config="/nonexistent-dockyard", credentials=((fake.host, ALICE),))
        with pytest.raises(AuthError, match="redirected a request carrying credentials"):
            await pull(f"{fake.host}/app/realm:v1", store=LocalStore(tmp_path / "s"), options=options)
        assert other.calls == [], other.calls
    finally:
        await runner.cleanup()


# -- the same checks where push, copy and unpack read manifests -----------------------------

async def test_cli_copy_from_a_hostile_registry_is_one_line(fake, tmp_path):
    child = image(fake, "app/copy", "child", layer_patch=set_size(-1))
    fake.add_index("app/copy", "v1", [child])
    # to a registry (nothing listens on the destination: the source is refused first) and to a layout
    code, _, err = await run_cli("copy", f"{fake.host}/app/copy:v1", "127.0.0.1:9/dest/app:v1")
    assert_one_line(code, err, "layers[0]", "size must be an integer")
    code, _, err = await run_cli("copy", f"{fake.host}/app/copy:v1", f"oci:{tmp_path / 'layout'}:v1")
    assert_one_line(code, err, "layers[0]", "size must be an integer")
    assert fake.count("GET", "/blobs/") == 0
    assert leftovers(LocalStore(tmp_path / "layout")) == []


def _tamper(layout: Path, change) -> None:
    """Rewrite the single manifest of a layout with `change(manifest dict)`, re-pointing index.json."""
    store = LocalStore(layout)
    index = json.loads((layout / "index.json").read_text())
    entry = index["manifests"][0]
    body = json.loads(store.read_blob(entry["digest"]))
    change(body)
    data = json.dumps(body).encode()
    entry.update(digest=store.write_blob(data), size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("case", ["layer-without-digest", "layers-not-objects", "index-entry-not-object",
                                  "diff-id-not-a-digest"])
async def test_cli_unpack_and_push_of_a_malformed_layout_are_one_line(tmp_path, case):
    layout = tmp_path / "layout"
    _oci_layout(layout, 10)
    if case == "layer-without-digest":
        _tamper(layout, lambda m: m["layers"][0].pop("digest"))
        expected = "layers[0]: no digest"
    elif case == "layers-not-objects":
        _tamper(layout, lambda m: m.update(layers=[m["layers"][0]["digest"]]))
        expected = "layers[0]: a descriptor must be a JSON object"
    elif case == "index-entry-not-object":
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": ["latest"]}))
        expected = "manifests[0]: a descriptor must be a JSON object"
    else:
        store = LocalStore(layout)

        def bad_config(m):
            config = json.dumps({"architecture": "amd64", "os": "linux",
                                 "rootfs": {"type": "layers", "diff_ids": ["../../../../tmp/x"]}}).encode()
            m["config"].update(digest=store.write_blob(config), size=len(config))
        _tamper(layout, bad_config)
        expected = "diff_ids[0]: invalid digest"
    code, _, err = await run_cli("unpack", "--no-cache", f"oci:{layout}", str(tmp_path / "bundle"))
    assert_one_line(code, err, expected)
    assert not (tmp_path / "bundle" / "rootfs").exists()
    if case != "diff-id-not-a-digest":      # push never reads the config
        code, _, err = await run_cli("push", f"oci:{layout}:latest", "127.0.0.1:9/dest/app:v1")
        assert_one_line(code, err, expected)
