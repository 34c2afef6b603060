"""An upload received by one worker and finished by another: the receiver
records the digest of what it wrote, so the finishing worker need not read
the whole upload back; a record that no longer matches the upload is ignored."""

from __future__ import annotations

import os

import pytest

import storage.uploads as uploads_module
from storage import layout
from storage.oci.errors import DigestInvalid
from tests.support.content import chunks as body, sha256_digest as sha256


@pytest.fixture
async def workers(open_store):
    """Two ContentStores on one storage (every registered driver; for a
    filesystem_only test, the root tmp_path / "root"): what two worker
    processes see."""
    return await open_store(), await open_store()


@pytest.mark.filesystem_only("reads the digest record's file under the root")
async def test_finish_on_another_worker_uses_the_record(workers, monkeypatch, tmp_path):
    receiver, finisher = workers
    data = os.urandom(3 * 1024 * 1024 + 5)
    upload = await receiver.uploads.start("r")
    await receiver.uploads.append("r", upload.upload_id, body(data[:1 << 20], data[1 << 20:]))
    record = tmp_path / "root" / layout.upload_digest_record("r", upload.upload_id).lstrip("/")
    assert record.read_text() == f"{len(data)} {sha256(data)}"

    def no_rehash(*args):
        raise AssertionError("the finishing worker read the upload back")

    monkeypatch.setattr(uploads_module, "_hash_open_file", no_rehash)
    info = await finisher.uploads.finish("r", upload.upload_id, sha256(data))
    assert (info.digest, info.size) == (sha256(data), len(data))
    got = b"".join([c async for c in finisher.blobs.read(sha256(data))])
    assert got == data


async def test_a_stale_record_is_ignored(workers):
    receiver, other = workers
    data = os.urandom(2 * 1024 * 1024)
    upload = await receiver.uploads.start("r")
    await receiver.uploads.append("r", upload.upload_id, body(data))
    # Another worker appends (it has no running hash: the record stays at the old size).
    await other.uploads.append("r", upload.upload_id, body(b"tail"))
    full = data + b"tail"
    with pytest.raises(DigestInvalid):
        await receiver.uploads.finish("r", upload.upload_id, sha256(data))
    info = await receiver.uploads.finish("r", upload.upload_id, sha256(full))
    assert info.size == len(full)


@pytest.mark.filesystem_only("looks for the digest record's file under the root")
async def test_small_uploads_leave_no_record(workers, tmp_path):
    receiver, finisher = workers
    data = b"small" * 100
    upload = await receiver.uploads.start("r")
    await receiver.uploads.append("r", upload.upload_id, body(data))
    record = tmp_path / "root" / layout.upload_digest_record("r", upload.upload_id).lstrip("/")
    assert not record.exists()
    assert (await finisher.uploads.finish("r", upload.upload_id, sha256(data))).size == len(data)


async def test_started_on_one_worker_received_on_another(workers, monkeypatch):
    """POST on one worker, the whole body PATCHed on a second, PUT on the
    first: the second hashes as it receives and records the digest."""
    starter, receiver = workers
    data = os.urandom(2 * 1024 * 1024)
    upload = await starter.uploads.start("r")
    await receiver.uploads.append("r", upload.upload_id, body(data))

    def no_rehash(*args):
        raise AssertionError("the finishing worker read the upload back")

    monkeypatch.setattr(uploads_module, "_hash_open_file", no_rehash)
    info = await starter.uploads.finish("r", upload.upload_id, sha256(data))
    assert info.size == len(data)
