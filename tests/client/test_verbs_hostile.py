"""The registry verbs against a registry that lies: a blob whose bytes do not
match its digest never becomes the -o file (nothing half-written is left),
and is an error on stdout too; a manifest asked for by digest that comes back
as other bytes is refused (distribution spec "Pulling manifests": the
client verifies the digest)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.client.fakeregistry import FakeRegistry, digest, start_app
from tests.support import REPO_ROOT


async def dockyard(*args: str) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "puller", *args, cwd=REPO_ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "DOCKER_CONFIG": "/nonexistent"})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out, err.decode()


async def test_corrupt_blob_leaves_no_file_and_fails(tmp_path):
    registry = FakeRegistry()
    layer = os.urandom(300_000)
    registry.add_image("hostile/app", "v1", [layer])
    registry.corrupt.add(digest(layer))
    runner, host = await start_app(registry.app())
    try:
        target = tmp_path / "layer.bin"
        code, _, err = await dockyard("blob", "--plain-http", "-o", str(target), f"{host}/hostile/app@{digest(layer)}")
        assert code == 1
        assert err.strip().splitlines() == [
            f"dockyard: error: blob {digest(layer)} in {host}/hostile/app: content hashes to "
            f"{digest(bytes([layer[0] ^ 0xFF]) + layer[1:])}"]
        assert os.listdir(tmp_path) == []
        code, _, err = await dockyard("blob", "--plain-http", f"{host}/hostile/app@{digest(layer)}")
        assert code == 1 and "content hashes to" in err
        registry.corrupt.clear()
        code, out, _ = await dockyard("blob", "--plain-http", f"{host}/hostile/app@{digest(layer)}")
        assert code == 0 and out == layer
    finally:
        await runner.cleanup()


async def test_manifest_by_digest_that_does_not_match_is_refused(tmp_path):
    registry = FakeRegistry()
    registry.add_image("hostile/app", "v1", [b"layer"])
    body, media_type = registry.manifests[("hostile/app", "v1")]
    wanted = "sha256:" + "ab" * 32
    registry.manifests[("hostile/app", wanted)] = (body, media_type)     # other bytes under that digest
    runner, host = await start_app(registry.app())
    try:
        code, out, err = await dockyard("manifest", "--plain-http", "--json", f"{host}/hostile/app@{wanted}")
        assert code == 1 and "does not match its digest" in err
        assert "error" in json.loads(out)
        code, out, _ = await dockyard("digest", "--plain-http", f"{host}/hostile/app:v1")
        assert code == 0 and out.decode().strip() == digest(body)
    finally:
        await runner.cleanup()
