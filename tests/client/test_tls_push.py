"""TLS options (--ca-file, --insecure), refused token realms, and chunked uploads."""

from __future__ import annotations

import os

import pytest

from puller.client.auth import AuthError
from puller.client.http import ClientOptions, RegistryClient, TransportError
from puller.transfer.pull import pull
from puller.transfer.push import push_image
from puller.transfer.sources import LayoutSource
from puller.client.reference import parse_reference
from puller.store import LocalStore

from tests.client.fakeregistry import FakeRegistry, digest, start_app
from tests.support.content import write_oci_layout
from tests.support.tls import server_files


@pytest.fixture
async def tls_fake(tmp_path):
    tls = server_files(tmp_path / "tls")          # a throwaway CA and a certificate for 127.0.0.1
    registry = FakeRegistry()
    runner, host = await start_app(registry.app(), ssl_context=tls.server_context())
    registry.host, registry.cert = host, str(tls.ca_cert)
    yield registry
    await runner.cleanup()


async def test_tls_registry_needs_trust(tls_fake, tmp_path):
    layer = os.urandom(10_000)
    tls_fake.add_image("tls/app", "v1", [layer])
    ref = f"{tls_fake.host}/tls/app:v1"
    with pytest.raises(TransportError, match="--ca-file or --insecure"):
        await pull(ref, store=LocalStore(tmp_path / "a"), options=ClientOptions(retries=0))
    store = LocalStore(tmp_path / "b")
    await pull(ref, store=store, options=ClientOptions(ca_file=tls_fake.cert))
    assert store.read_blob(digest(layer)) == layer
    store = LocalStore(tmp_path / "c")
    await pull(ref, store=store, options=ClientOptions(insecure=True))
    assert store.read_blob(digest(layer)) == layer
    assert all(r.method in ("GET", "HEAD") for r in tls_fake.requests)


async def test_plain_http_token_realm_refused_for_tls_registry(tls_fake, tmp_path):
    tls_fake.add_image("tls/app", "v1", [b"x"])
    tls_fake.challenge = 'Bearer realm="http://127.0.0.1:9/token",service="fake"'
    with pytest.raises(AuthError, match="refusing token realm http://127.0.0.1:9/token"):
        await pull(f"{tls_fake.host}/tls/app:v1", store=LocalStore(tmp_path / "s"),
                   options=ClientOptions(ca_file=tls_fake.cert))


@pytest.mark.interop
async def test_chunked_patch_upload_round_trip(distribution_registry, tmp_path):
    """Blobs over the monolithic limit go up in PATCH chunks with Content-Range."""
    image = write_oci_layout(tmp_path / "layout", layer_sizes=[3 * 1024 * 1024 + 77, 500], tag="v1")
    host = distribution_registry.host
    options = ClientOptions(monolithic_limit=1024 * 1024, upload_chunk_size=1024 * 1024)
    dest = parse_reference(f"{host}/chunked/app:v1")
    async with RegistryClient(options) as client:
        result = await push_image(LayoutSource(LocalStore(image.path), "v1"), client, dest)
    assert result.blobs_uploaded == 3 and result.bytes_uploaded > 3 * 1024 * 1024
    store = LocalStore(tmp_path / "store")
    pulled = await pull(str(dest), store=store)
    assert pulled.manifest_digest == image.digest
    for layer in image.layers:
        assert store.read_blob(layer) == LocalStore(image.path).read_blob(layer)


@pytest.mark.interop
async def test_registry_to_registry_copy_streams_chunks_with_range(distribution_registry, dockyard_registry,
                                                                   tmp_path):
    """copy streams each PATCH chunk from a Range GET on the source, digests unchanged."""
    from puller.transfer.copy import copy
    image = write_oci_layout(tmp_path / "layout", layer_sizes=[2 * 1024 * 1024 + 5, 300], tag="v1")
    src = f"{distribution_registry.host}/copysrc/app:v1"
    async with RegistryClient(ClientOptions()) as client:
        await push_image(LayoutSource(LocalStore(image.path), "v1"), client, parse_reference(src))
    dst = f"{dockyard_registry.host}/copydst-{os.getpid()}/app:v1"
    options = ClientOptions(monolithic_limit=512 * 1024, upload_chunk_size=512 * 1024)
    result = await copy(src, dst, options=options)
    assert result.digest == image.digest and result.bytes_transferred > 2 * 1024 * 1024
    store = LocalStore(tmp_path / "store")
    pulled = await pull(dst, store=store)
    assert pulled.manifest_digest == image.digest
    for layer in image.layers:
        assert store.read_blob(layer) == LocalStore(image.path).read_blob(layer)
