"""The commit of a blob whose digest is known before its first byte, on S3
(distribution spec, "Pushing a blob monolithically" and "POST then PUT"):
the bytes go straight to the blob's key, in a multipart upload completed
there only after they hashed to its name (or one PUT under a part), so no
server-side copy follows and the key never shows other bytes; a mismatch
aborts the upload and leaves nothing, not even a multipart upload.

They run on every registered S3 endpoint, each on a prefix of its own that
must be empty afterwards (objects and multipart uploads alike). The
requests are counted with botocore's event hooks on the driver's client.
"""

from __future__ import annotations

import os

import pytest

from storage import layout
from storage.oci.errors import DigestInvalid, SizeInvalid
from storage.store import ContentStore
from tests.support.content import chunks, sha256_digest
from tests.storage.s3_fixtures import kind, requires_s3, space  # noqa: F401 (fixtures)
from tests.support.drivers import DriverSpace
from tests.support.s3 import Requests, s3_target

MIB = 1 << 20
pytestmark = requires_s3


@pytest.fixture
async def store(space) -> ContentStore:
    return ContentStore(await space.open())


def blob_key(space: DriverSpace, digest: str) -> str:
    return s3_target(space.name).settings(space.prefix).key_prefix + layout.blob_data(digest)[1:]


def blob_visible(space: DriverSpace, digest: str) -> bool:
    target = s3_target(space.name)
    try:
        target.client.head_object(Bucket=target.bucket, Key=blob_key(space, digest))
        return True
    except target.client.exceptions.ClientError:
        return False


async def test_monolithic_put_completes_at_the_blob_key_without_a_copy(store, space):
    """12 MiB with ?digest=: three parts of an upload at the blob's own key,
    completed there; invisible while the body is still coming, no
    CopyObject or UploadPartCopy, no session objects."""
    payload = os.urandom(12 * MIB)
    digest = sha256_digest(payload)
    requests = Requests(store.driver)
    seen_midway = []

    async def body():
        yield payload[:11 * MIB]
        seen_midway.append((blob_visible(space, digest), s3_target(space.name).uploads(space.prefix)))
        yield payload[11 * MIB:]

    info = await store.uploads.put("direct/repo", digest, body(), size=len(payload))
    assert (info.digest, info.size) == (digest, len(payload))
    [(visible, uploads)] = seen_midway
    assert not visible and [u["Key"] for u in uploads] == [blob_key(space, digest)]
    names = requests.names()
    assert "CopyObject" not in names and "UploadPartCopy" not in names
    completes = [key for name, key in requests.sent if name == "CompleteMultipartUpload"]
    assert completes == [blob_key(space, digest)] and names.count("UploadPart") == 3
    assert not [key for _, key in requests.sent if key and "/_uploads/" in key]
    assert b"".join([c async for c in store.blobs.read(digest)]) == payload
    assert (await store.blobs.stat("direct/repo", digest)).size == len(payload)


async def test_post_then_put_with_the_whole_body_completes_at_the_blob_key(store, space):
    payload = os.urandom(7 * MIB)
    digest = sha256_digest(payload)
    status = await store.uploads.start("direct/twostep")
    requests = Requests(store.driver)
    info = await store.uploads.finish("direct/twostep", status.upload_id, digest, chunks(payload))
    assert info.size == len(payload)
    assert [key for name, key in requests.sent if name == "CompleteMultipartUpload"] == [blob_key(space, digest)]
    assert "CopyObject" not in requests.names()
    assert b"".join([c async for c in store.blobs.read(digest)]) == payload
    with pytest.raises(Exception, match="upload unknown"):
        await store.uploads.status("direct/twostep", status.upload_id)


@pytest.mark.parametrize("size", [12 * MIB, 1000], ids=["multipart", "one-put"])
async def test_a_digest_mismatch_aborts_and_leaves_nothing(store, space, size):
    """Wrong digest: DigestInvalid, the upload at the blob key aborted (none
    listed afterwards), neither the claimed nor the actual digest stored."""
    payload = os.urandom(size)
    wrong = sha256_digest(b"something else")
    requests = Requests(store.driver)
    with pytest.raises(DigestInvalid):
        await store.uploads.put("direct/wrong", wrong, chunks(payload), size=size)
    assert s3_target(space.name).uploads(space.prefix) == []
    assert not blob_visible(space, wrong) and not blob_visible(space, sha256_digest(payload))
    if size < MIB:
        assert "PutObject" not in requests.names()            # nothing sent before the check
    else:
        assert requests.names().count("AbortMultipartUpload") == 1
    assert s3_target(space.name).keys(space.prefix) == []


async def test_a_body_shorter_than_announced_aborts_and_leaves_nothing(store, space):
    payload = os.urandom(6 * MIB)
    with pytest.raises(SizeInvalid):
        await store.uploads.put("direct/short", sha256_digest(payload), chunks(payload), size=len(payload) + 1)
    assert s3_target(space.name).uploads(space.prefix) == []
    assert s3_target(space.name).keys(space.prefix) == []
