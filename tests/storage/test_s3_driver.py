"""What only the S3 driver has: multipart uploads and their state in the
bucket, the part-size rule, lease locks, presigned URLs, the start-up
check, tolerance of Ceph's answers, and its settings.

They run on every registered S3 endpoint (tests.support.s3: "s3-moto", and
a real Ceph RGW where one is registered), each test on a prefix of its own
that must be empty afterwards: no object AND no multipart upload left. The
requests the driver makes are counted with botocore's own event hooks on
the driver's client; nothing in the driver is mocked.

moto checks no signatures and ignores the If-Match conditions of
CompleteMultipartUpload and CopyObject, and gives every multipart upload
the same Initiated time (2010): what these tests prove about signatures,
presigned URLs and conditional completes, only the Ceph run proves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from storage.config import MIB, S3Settings, StorageConfigError, StorageSettings
from storage.driver import PathNotFound, StorageError
from storage.s3 import S3Driver, max_object_size, part_size_for
from storage.s3 import multipart
from storage.s3.client import META_UPLOAD, bare, bare_conditions, quoted
from storage.store import ContentStore
from tests.support.content import chunks, sha256_digest
from tests.support.drivers import DriverSpace, driver_kind, driver_names
from tests.support.s3 import s3_target

REPO_ROOT = Path(__file__).resolve().parents[2]


def _s3_kinds() -> list[str]:
    names = []
    for name in driver_names():
        try:
            s3_target(name)
        except KeyError:
            continue
        names.append(name)
    return names


S3_KINDS = _s3_kinds()
pytestmark = pytest.mark.skipif(not S3_KINDS, reason="no S3 storage driver registered (tests.support.s3)")


@pytest.fixture(params=S3_KINDS or ["none"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def target(kind):
    return s3_target(kind)


@pytest.fixture
async def space(kind, driver_scratch):
    """A prefix of this test's; afterwards it must hold no object and no upload."""
    space = DriverSpace(driver_kind(kind), driver_scratch)
    yield space
    await space.destroy()


@pytest.fixture
async def driver(space) -> S3Driver:
    return await space.open()


class Requests:
    """The S3 operations a driver's client sends, with their keys (a botocore event hook)."""

    def __init__(self, driver: S3Driver):
        self.sent: list[tuple[str, str | None]] = []
        self.params: list[tuple[str, dict]] = []
        driver.client.meta.events.register("before-parameter-build.s3", self._record)

    def _record(self, params, model, **kwargs) -> None:
        self.sent.append((model.name, params.get("Key")))
        self.params.append((model.name, dict(params)))

    def names(self) -> list[str]:
        return [name for name, _ in self.sent]

    def clear(self) -> None:
        self.sent.clear()


def uploads_under(target, prefix: str) -> list[dict]:
    return target.uploads(prefix)


async def read_all(driver, path: str) -> bytes:
    return b"".join([c async for c in driver.reader(path)])


# ---- the part-size rule (pure) ---------------------------------------------------

def test_part_size_doubles_every_thousand_parts_and_never_runs_out_below_5_tib():
    base = 16 * MIB
    assert [part_size_for(n, base) for n in (1, 1000, 1001, 2000, 2001, 3001)] == [
        16 * MIB, 16 * MIB, 32 * MIB, 32 * MIB, 64 * MIB, 128 * MIB]
    assert (part_size_for(7001, base), part_size_for(8001, base), part_size_for(9001, base)) == (
        2 << 30, 4 << 30, 5 << 30)                          # 16 MiB * 2**8, then the last thousand at 5 GiB
    assert part_size_for(1001, 5 << 30) == 5 << 30          # never above S3's largest part
    assert all(part_size_for(n, 5 * MIB) == 5 << 30 for n in (9001, 9500, 10_000))
    for n in (0, 10_001):
        with pytest.raises(ValueError):
            part_size_for(n, base)
    five_tib = 5 << 40
    for b in (5 * MIB, 8 * MIB, 16 * MIB, 64 * MIB, 5 << 30):
        sizes = [part_size_for(n, b) for n in range(1, 10_001)]
        assert sizes == sorted(sizes) and max(sizes) <= 5 << 30 and min(sizes) >= 5 * MIB
        assert max_object_size(b) == sum(sizes) >= five_tib, b
    assert max_object_size(16 * MIB) >= 12 << 40            # 12.7 TiB with the default base


def test_copy_pieces_cover_the_object_within_part_limits():
    for size in (5 * MIB, 5 << 30, (5 << 30) + 1, 5 << 40, 123_456_789_012):
        pieces = multipart.copy_pieces(size)
        assert sum(n for _, n in pieces) == size
        assert all(start == sum(n for _, n in pieces[:i]) for i, (start, _) in enumerate(pieces))
        assert all(5 * MIB <= n <= multipart.COPY_PIECE for _, n in pieces) and len(pieces) <= 10_000


def test_etags_are_compared_quoted_and_sent_bare():
    """Ceph answers UploadPartCopy with an unquoted ETag; AWS quotes it. A
    condition sends it bare: Ceph's PUT If-Match compares it unquoted
    (storage.s3.client.bare); the Ceph run of the writer tests proves it."""
    assert quoted('abc') == quoted('"abc"') == '"abc"'
    assert quoted("") == ""
    assert bare('"abc"') == bare("abc") == bare('W/"abc"') == "abc"
    assert bare_conditions({"IfMatch": '"abc"', "IfNoneMatch": "*", "Key": '"k"'}) == {
        "IfMatch": "abc", "IfNoneMatch": "*", "Key": '"k"'}


# ---- settings ---------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (dict(part_size=4 * MIB), "storage.s3.part_size"),
    (dict(part_size=(5 << 30) + 1), "storage.s3.part_size"),
    (dict(addressing_style="dns"), "storage.s3.addressing_style"),
    (dict(sse="kms"), "storage.s3.sse"),
    (dict(sse_kms_key_id="key-1"), "storage.s3.sse_kms_key_id"),
    (dict(storage_class="GLACIER"), "storage.s3.storage_class"),
    (dict(storage_class="standard ia"), "storage.s3.storage_class"),
    (dict(presign_expires=0), "storage.s3.presign_expires"),
    (dict(presign_expires=8 * 24 * 3600), "storage.s3.presign_expires"),
    (dict(endpoint_url="localhost:9000"), "storage.s3.endpoint_url"),
    (dict(access_key_id="AKIA"), "storage.s3.access_key_id"),
    (dict(prefix="a/../b"), "storage.s3.prefix"),
    (dict(bucket=""), "storage.s3.bucket"),
    (dict(max_connections=0), "storage.s3.max_connections"),
])
def test_s3_settings_are_checked_with_one_line_naming_the_key(overrides, key):
    values = dict(bucket="b") | overrides
    with pytest.raises(StorageConfigError) as err:
        StorageSettings(driver="s3", s3=S3Settings(**values)).check()
    message = str(err.value)
    assert key in message and "\n" not in message
    assert "AKIA" not in message or key == "storage.s3.access_key_id"


def test_s3_settings_defaults_and_resolution():
    s = S3Settings(bucket="b")
    StorageSettings(driver="s3", s3=s).check()
    assert (s.part_size, s.addressing_style, s.resolved_addressing_style) == (16 * MIB, "auto", "auto")
    assert S3Settings(bucket="b", endpoint_url="http://ceph:7480").resolved_addressing_style == "path"
    assert S3Settings(bucket="b", endpoint_url="http://x", addressing_style="virtual").resolved_addressing_style == "virtual"
    assert [S3Settings(bucket="b", prefix=p).key_prefix for p in ("", "/", "a", "/a/b/", "a/b")] == [
        "", "", "a/", "a/b/", "a/b/"]
    StorageSettings(driver="filesystem", s3=S3Settings(part_size=1)).check()   # only checked when used


# ---- writes: one PUT below a part, multipart above, state in the bucket ------------

async def test_a_blob_smaller_than_a_part_is_one_put_object(driver):
    requests = Requests(driver)
    w = await driver.writer("/up/data")
    for _ in range(4):
        await w.write(os.urandom(MIB))                   # 4 MiB: under the 5 MiB part
    await w.commit()
    assert [n for n in requests.names() if n != "HeadObject"] == ["PutObject"]
    assert (await driver.stat("/up/data")).size == 4 * MIB

    # The same through the content store: a monolithic push of a small blob.
    store = ContentStore(driver)
    blob = os.urandom(3 * MIB)
    requests.clear()
    await store.uploads.put("small/blob", sha256_digest(blob),
                            chunks(*(blob[i:i + MIB // 4] for i in range(0, len(blob), MIB // 4))))
    names = requests.names()
    assert not {"CreateMultipartUpload", "UploadPart", "UploadPartCopy", "CompleteMultipartUpload"} & set(names)
    data_puts = [k for n, k in requests.sent if n == "PutObject" and k.endswith("/data")]
    assert len(data_puts) == 2                           # the session's empty start, then the bytes: one PUT
    assert b"".join([c async for c in store.blobs.read(sha256_digest(blob))]) == blob


async def test_multipart_upload_continued_by_another_replica(space, target):
    """Two replicas (driver instances) append to one file in turns, each
    through a writer of its own, as the registry does per PATCH: full parts
    go to one multipart upload, the tail under a part waits in the bucket,
    and the file reads back whole once complete."""
    a, b = await space.open(), await space.open()
    pieces = [os.urandom(7 * MIB), os.urandom(9 * MIB), os.urandom(2 * MIB), os.urandom(3 * MIB)]
    replicas = [a, b, a, b]
    expected = b""
    for replica, piece in zip(replicas, pieces):
        w = await replica.writer("/s/data", append=True)
        assert w.size == len(expected)
        await w.write(piece[:MIB])
        await w.write(piece[MIB:])
        await w.commit()
        expected += piece
        for other in (a, b):
            assert (await other.stat("/s/data")).size == len(expected)

    key = target.settings(space.prefix).key_prefix + "s/data"
    head = target.client.head_object(Bucket=target.bucket, Key=key)
    upload_id = head["Metadata"][META_UPLOAD]                # pending: the state is the object
    [upload] = uploads_under(target, space.prefix)
    assert upload["UploadId"] == upload_id
    parts = target.client.list_parts(Bucket=target.bucket, Key=key, UploadId=upload_id)["Parts"]
    assert [p["Size"] for p in parts] == [5 * MIB] * 4        # 20 MiB in parts
    state = target.client.get_object(Bucket=target.bucket, Key=key)["Body"].read()
    assert state.endswith(expected[20 * MIB:]) and len(expected) - 20 * MIB == MIB   # the tail, in the bucket

    assert await b.get_content("/s/data") == expected       # the first read completes it
    assert uploads_under(target, space.prefix) == []
    assert META_UPLOAD not in target.client.head_object(Bucket=target.bucket, Key=key)["Metadata"]
    assert await read_all(a, "/s/data") == expected


async def test_chunked_push_alternating_replicas_with_chunks_under_a_part(space):
    """PATCH chunks of 3 MiB (under S3's 5 MiB part) alternate between two
    content stores; the other one finishes: the digest matches, the blob
    is whole, and no upload is left."""
    one, two = ContentStore(await space.open()), ContentStore(await space.open())
    blob = os.urandom(17 * MIB + 12345)
    digest = sha256_digest(blob)
    status = await one.uploads.start("chunked/repo")
    step = 3 * MIB
    for i, at in enumerate(range(0, len(blob), step)):
        store = (one, two)[i % 2]
        status = await store.uploads.append("chunked/repo", status.upload_id, chunks(blob[at:at + step]), start=at)
        assert status.offset == min(at + step, len(blob))
    info = await (two, one)[i % 2].uploads.finish("chunked/repo", status.upload_id, digest)
    assert info.size == len(blob)
    fresh = ContentStore(await space.open())
    assert b"".join([c async for c in fresh.blobs.read(digest)]) == blob


async def test_a_whole_object_of_a_part_or_more_is_continued_on_the_server(driver, target, space):
    big = os.urandom(6 * MIB)
    await driver.put_content("/c/data", big)
    requests = Requests(driver)
    w = await driver.writer("/c/data", append=True)
    await w.write(b"tail")
    await w.commit()
    assert "UploadPartCopy" in requests.names()
    assert ("GetObject", target.settings(space.prefix).key_prefix + "c/data") not in requests.sent
    assert (await driver.stat("/c/data")).size == len(big) + 4
    assert await driver.get_content("/c/data") == big + b"tail"


async def test_big_parts_are_spooled_to_disk_and_a_big_tail_is_a_part_of_its_own(space, target, monkeypatch):
    """Parts past 64 MiB are filled in a temporary file, not in memory, and
    a tail past 64 MiB goes up as a part on commit instead of into the
    state object: scaled down here (2 MiB spooling, 6 MiB tails, 12 MiB parts)."""
    monkeypatch.setattr(multipart, "MEMORY_PART_MAX", 2 * MIB)
    monkeypatch.setattr(multipart, "TAIL_IN_STATE_MAX", 6 * MIB)
    spooled = []
    real = multipart._PartBuffer.append

    async def watched(self, data, calls):
        await real(self, data, calls)
        if self._file is not None and not spooled:
            spooled.append(self.size)

    monkeypatch.setattr(multipart._PartBuffer, "append", watched)
    settings = dataclasses.replace(target.settings(space.prefix), part_size=12 * MIB)
    one, two = S3Driver(settings), S3Driver(settings)
    try:
        small = os.urandom(10 * MIB)                       # under a part: one PUT, from the file
        w = await one.writer("/small")
        await w.write(small)
        await w.commit()
        assert spooled and await two.get_content("/small") == small

        first, more = os.urandom(20 * MIB), os.urandom(3 * MIB)
        w = await one.writer("/big", append=True)
        for at in range(0, len(first), MIB):
            await w.write(first[at:at + MIB])
        await w.commit()                                    # a 12 MiB part, and the 8 MiB tail as a part
        key = settings.key_prefix + "big"
        head = target.client.head_object(Bucket=target.bucket, Key=key)
        parts = target.client.list_parts(Bucket=target.bucket, Key=key,
                                         UploadId=head["Metadata"][META_UPLOAD])["Parts"]
        assert [p["Size"] for p in parts] == [12 * MIB, 8 * MIB] and head["ContentLength"] < MIB
        w = await two.writer("/big", append=True)           # goes on at part 3
        await w.write(more)
        await w.commit()
        assert await one.get_content("/big") == first + more
    finally:
        await one.close()
        await two.close()


async def test_cancel_aborts_the_upload_and_leaves_nothing(space, target):
    driver = await space.open()
    w = await driver.writer("/x/data")
    await w.write(os.urandom(12 * MIB))                    # two parts sent
    assert len(uploads_under(target, space.prefix)) == 1
    await w.cancel()
    assert uploads_under(target, space.prefix) == []
    with pytest.raises(PathNotFound):
        await driver.stat("/x/data")

    # a pending file continued and then cancelled: upload and state both go
    w = await driver.writer("/y/data")
    await w.write(os.urandom(6 * MIB))
    await w.commit()
    w = await driver.writer("/y/data", append=True)
    await w.write(b"more")
    await w.cancel()
    assert uploads_under(target, space.prefix) == [] and target.keys(space.prefix) == []


async def test_deleting_a_directory_aborts_the_uploads_under_it(space, target):
    driver = await space.open()
    w = await driver.writer("/sess/data")
    await w.write(os.urandom(6 * MIB))
    await w.commit()                                        # pending: an upload with one part
    assert len(uploads_under(target, space.prefix)) == 1
    await driver.delete("/sess")
    assert uploads_under(target, space.prefix) == []
    w = await driver.writer("/file", append=True)
    await w.write(os.urandom(6 * MIB))
    await w.commit()
    upload = uploads_under(target, space.prefix)[0]        # aborted behind the driver's back (Ceph then
    target.client.abort_multipart_upload(Bucket=target.bucket, Key=upload["Key"],    # says NoSuchUpload)
                                         UploadId=upload["UploadId"])
    await driver.delete("/file")                            # still deletes the file
    with pytest.raises(PathNotFound):
        await driver.stat("/file")


async def test_reclaim_aborts_an_upload_no_file_names(space, target):
    driver = await space.open()
    kept = await driver.writer("/kept/data")                # a pending file: its upload is its bytes
    await kept.write(os.urandom(6 * MIB))
    await kept.commit()
    crashed = await driver.writer("/crashed/data")          # a writer that died after sending a part
    await crashed.write(os.urandom(5 * MIB))
    await crashed._settle()
    assert len(uploads_under(target, space.prefix)) == 2
    assert await driver.reclaim_leftovers(time.time() - 3600 * 24 * 365 * 100) == 0   # none that old
    assert await driver.reclaim_leftovers(time.time() + 60) == 1
    [left] = uploads_under(target, space.prefix)
    assert left["Key"].endswith("/kept/data")
    assert len(await driver.get_content("/kept/data")) == 6 * MIB


async def test_storage_class_and_encryption_reach_every_write(space, target):
    """The storage class on objects of 128 KiB or more (blobs, not links),
    server-side encryption on every object the driver writes, its own
    state and locks included (a bucket policy may refuse any other). An
    endpoint that refuses AES256 over the tests' plain HTTP (Ceph) checks
    the storage class alone; test_s3_ceph checks that refusal."""
    sse = "AES256" if target.accepts_sse else ""
    settings = dataclasses.replace(target.settings(space.prefix), storage_class="STANDARD_IA", sse=sse)
    driver = S3Driver(settings)
    try:
        requests = Requests(driver)
        await driver.put_content("/c/link", b"sha256:abc")
        await driver.put_content("/c/blob", os.urandom(200 << 10))
        w = await driver.writer("/c/up", append=True)
        await w.write(os.urandom(6 * MIB))
        await w.commit()
        lock = await driver.try_lock("/c/lock")
        await lock.release()
        await driver.move("/c/up", "/c/moved")
        writes = [(n, p) for n, p in requests.params
                  if n in ("PutObject", "CreateMultipartUpload", "CopyObject")]
        assert {n for n, _ in writes} == {"PutObject", "CreateMultipartUpload", "CopyObject"}
        assert all(p.get("ServerSideEncryption") == (sse or None) for _, p in writes)
        classes = {p["Key"].rsplit("/", 1)[-1]: p.get("StorageClass") for _, p in writes}
        assert classes["link"] is None and classes["blob"] == "STANDARD_IA" and classes["moved"] == "STANDARD_IA"
        head = target.client.head_object(Bucket=target.bucket, Key=settings.key_prefix + "c/moved")
        assert head.get("ServerSideEncryption") == (sse or None) and head.get("StorageClass") == "STANDARD_IA"
    finally:
        await driver.close()


async def test_a_part_failing_once_is_sent_again(driver):
    """An UploadPart answered 500 once (a botocore hook stands in for the
    server's answer) is retried by the client's standard retries: the
    upload completes with the right bytes."""
    from botocore.awsrequest import AWSResponse

    failed = []

    class Raw:
        def stream(self, **kwargs):
            yield b""

    def fail_first_part(request, **kwargs):
        if "partNumber=2" in request.url and not failed:
            failed.append(request.url)
            return AWSResponse(request.url, 500, {}, Raw())
        return None

    driver.client.meta.events.register("before-send.s3.UploadPart", fail_first_part)
    payload = os.urandom(11 * MIB)
    w = await driver.writer("/r/data")
    await w.write(payload)
    await w.commit()
    assert failed
    assert await driver.get_content("/r/data") == payload


_APPENDER = """
import asyncio, json, sys
from storage.config import S3Settings
from storage.s3 import S3Driver
from storage.store import ContentStore

async def main():
    store = ContentStore(S3Driver(S3Settings(**json.loads(sys.argv[1])), lock_lease=1.0))
    repo, upload_id, start, size = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

    async def body():
        for _ in range(size // (1 << 20)):
            yield b"k" * (1 << 20)
        print("sent", flush=True)
        await asyncio.sleep(3600)              # the rest of the chunk never comes

    await store.uploads.append(repo, upload_id, body(), start=start)

asyncio.run(main())
"""


async def test_a_replica_killed_mid_chunk_leaves_a_session_another_finishes(space, target):
    """A process appending a chunk is SIGKILLed after sending two parts of
    it: the session still holds what was committed before, its lock is
    taken over once the lease (1 s here) runs out, another replica finishes
    the upload with the right digest, and the dead writer's multipart
    upload goes with the session."""
    settings = target.settings(space.prefix)
    store = ContentStore(S3Driver(settings, lock_lease=1.0))
    try:
        head, tail = os.urandom(3 * MIB), os.urandom(4 * MIB)
        status = await store.uploads.start("killed/repo")
        await store.uploads.append("killed/repo", status.upload_id, chunks(head), start=0)
        fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
        child = subprocess.Popen([sys.executable, "-c", _APPENDER, json.dumps(fields), "killed/repo",
                                  status.upload_id, str(len(head)), str(12 * MIB)],
                                 cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        try:
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
            assert line.strip() == "sent"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        assert len(uploads_under(target, space.prefix)) == 1      # the dead writer's parts
        assert (await store.uploads.status("killed/repo", status.upload_id)).offset == len(head)
        deadline = time.monotonic() + 15
        while True:                                               # as a client retries a 409
            try:
                await store.uploads.append("killed/repo", status.upload_id, chunks(tail), start=len(head))
                break
            except Exception as exc:
                assert type(exc).__name__ == "BlobUploadInvalid", exc
                assert time.monotonic() < deadline, "the dead writer's lock was never taken over"
                await asyncio.sleep(0.3)
        info = await store.uploads.finish("killed/repo", status.upload_id, sha256_digest(head + tail))
        assert info.size == len(head + tail)
        assert b"".join([c async for c in store.blobs.read(info.digest)]) == head + tail
        assert uploads_under(target, space.prefix) == []          # aborted with the session
    finally:
        await store.close()


# ---- server-side copies -------------------------------------------------------------

async def test_move_above_the_single_copy_limit_is_a_multipart_copy(driver, monkeypatch):
    """With the limits scaled down (5 GiB -> 6 MiB, 1 GiB pieces -> 6 MiB)
    a 15 MiB move takes the path a 6 GiB one does: three 5 MiB pieces."""
    monkeypatch.setattr(multipart, "S3_MAX_PART", 6 * MIB)
    monkeypatch.setattr(multipart, "COPY_PIECE", 6 * MIB)
    payload = os.urandom(15 * MIB)
    await driver.put_content("/m/src", payload)
    requests = Requests(driver)
    await driver.move("/m/src", "/m/dst")
    assert requests.names().count("UploadPartCopy") == 3 and "CopyObject" not in requests.names()
    assert await driver.get_content("/m/dst") == payload
    with pytest.raises(PathNotFound):
        await driver.stat("/m/src")


async def test_answers_as_ceph_gives_them_are_taken(driver):
    """Ceph RGW answers CompleteMultipartUpload with an empty ETag and
    UploadPartCopy with an unquoted one; the driver needs neither."""
    def ceph_like(parsed, model, **kwargs):
        if model.name == "CompleteMultipartUpload":
            parsed["ETag"] = ""
        elif model.name == "UploadPartCopy":
            parsed["CopyPartResult"]["ETag"] = parsed["CopyPartResult"]["ETag"].strip('"')

    driver.client.meta.events.register("after-call.s3", ceph_like)
    first, more = os.urandom(6 * MIB), os.urandom(7 * MIB)
    await driver.put_content("/q/data", first)
    w = await driver.writer("/q/data", append=True)        # continued by a copy, then a part
    await w.write(more)
    await w.commit()
    await driver.move("/q/data", "/q/moved")               # completed first, then copied
    assert await driver.get_content("/q/moved") == first + more


# ---- locks ----------------------------------------------------------------------

_HOLDER = """
import asyncio, json, sys
from storage.config import S3Settings
from storage.s3 import S3Driver

async def main():
    driver = S3Driver(S3Settings(**json.loads(sys.argv[1])), lock_lease=float(sys.argv[3]))
    lock = await driver.try_lock(sys.argv[2])
    print("held" if lock else "refused", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_lock_is_refused_while_renewed_and_taken_over_once_its_holder_dies(space, target):
    """A holder in another process keeps the lock past its lease by
    renewing it; SIGKILLed, it stops, and another driver takes the lock
    over once the lease (shortened to 1 s) has run out."""
    lease = 1.0
    driver = await space.open()
    await driver.put_content("/sess/data", b"")
    settings = target.settings(space.prefix)
    fields = {f: getattr(settings, f) for f in ("bucket", "region", "endpoint_url", "prefix", "access_key_id",
                                                "secret_access_key", "addressing_style")}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, json.dumps(fields), "/sess/lock", str(lease)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 60)
        assert line.strip() == "held"
        other = S3Driver(settings, lock_lease=lease)
        try:
            assert await other.try_lock("/sess/lock") is None
            await asyncio.sleep(lease + 2.5)                # past the lease: renewed meanwhile
            assert await other.try_lock("/sess/lock") is None
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            died = time.monotonic()
            lock = None
            while lock is None and time.monotonic() - died < lease + 10:
                lock = await other.try_lock("/sess/lock")
                if lock is None:
                    await asyncio.sleep(0.2)
            assert lock is not None, "the dead holder's lock was never taken over"
            assert await driver.try_lock("/sess/lock") is None        # and now held by the new holder
            await lock.release()
            again = await driver.try_lock("/sess/lock")
            assert again is not None
            await again.release()
        finally:
            await other.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


async def test_reclaim_removes_the_lock_of_a_dead_holder(space):
    driver = await space.open()
    holder = S3Driver(driver.settings, lock_lease=1.0)
    await driver.put_content("/sess/data", b"")
    lock = await holder.try_lock("/sess/lock")
    assert lock is not None
    await lock.abandon()                                    # dies: stops renewing, never releases
    await holder.close()
    await asyncio.sleep(3.2)
    assert await driver.reclaim_leftovers(time.time() + 60) == 1
    assert await driver.list("/sess") == ["/sess/data"]


# ---- direct access ----------------------------------------------------------------

async def test_presigned_url_fetch_returns_the_bytes(driver):
    """moto accepts any signature, so this proves the URL names the object
    and carries SigV4 query parameters; the Ceph run proves the signature."""
    payload = os.urandom(100_000)
    await driver.put_content("/blob/data", payload)
    url = await driver.url_for("/blob/data", expires_in=300)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=300" in url
    assert "dockyard-test-secret" not in url

    def fetch(url: str, method: str = "GET") -> tuple[int, bytes, dict]:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)

    status, body, _ = await asyncio.to_thread(fetch, url)
    assert (status, body) == (200, payload)
    default = await driver.url_for("/blob/data")
    assert f"X-Amz-Expires={driver.settings.presign_expires}" in default
    status, _, headers = await asyncio.to_thread(fetch, await driver.url_for("/blob/data", "HEAD"), "HEAD")
    assert status == 200 and int(headers["Content-Length"]) == len(payload)
    assert await driver.url_for("/blob/data", "PUT") is None
    assert await driver.open_local("/blob/data") is None


# ---- the start-up check -------------------------------------------------------------

async def test_start_up_check_names_the_problem_in_one_line(driver, target, space):
    await driver.check()                                    # the bucket is there
    base = target.settings(space.prefix)
    missing = S3Driver(dataclasses.replace(base, bucket="no-such-bucket-dockyard"))
    with pytest.raises(StorageConfigError, match=r"storage\.s3\.bucket: no bucket 'no-such-bucket-dockyard'"):
        await missing.check()
    await missing.close()
    unreachable = S3Driver(dataclasses.replace(base, endpoint_url="http://127.0.0.1:9"))
    started = time.monotonic()
    with pytest.raises(StorageConfigError, match=r"storage\.s3\.endpoint_url: cannot reach http://127\.0\.0\.1:9"):
        await unreachable.check()
    assert time.monotonic() - started < 30
    await unreachable.close()


async def test_encryption_the_endpoint_refuses_stops_start_up_in_one_line(target, space):
    """SSE AES256 where the endpoint refuses it (Ceph RGW 16.2 over plain
    HTTP: 400 InvalidRequest) fails the start-up check with one line naming
    storage.s3.sse, and a driver that skipped the check gets a StorageError
    (a 500 with an OCI body in the registry), not a crash. Where it is
    accepted (moto) the check passes and its probe object is gone again."""
    encrypted = S3Driver(dataclasses.replace(target.settings(space.prefix), sse="AES256"))
    try:
        if target.accepts_sse:
            await encrypted.check()
            await encrypted.put_content("/e/link", b"x")
            assert (await encrypted.get_content("/e/link")) == b"x"
            await encrypted.delete("/e")
            return
        with pytest.raises(StorageConfigError) as refused:
            await encrypted.check()
        line = str(refused.value)
        assert line.startswith("storage.s3.sse: ") and "AES256" in line and "InvalidRequest" in line, line
        assert "\n" not in line and target.secret_key not in line
        with pytest.raises(StorageError, match="InvalidRequest") as failed:
            await encrypted.put_content("/e/link", b"x")
        assert "\n" not in str(failed.value)
    finally:
        await encrypted.close()


def _serve_env(settings: S3Settings, **overrides: str) -> dict[str, str]:
    """DOCKYARD_STORAGE_S3_* for `dockyard serve`: the settings as a user
    would give them."""
    env = {"DOCKYARD_STORAGE_DRIVER": "s3"}
    for field in dataclasses.fields(settings):
        env[f"DOCKYARD_STORAGE_S3_{field.name.upper()}"] = str(getattr(settings, field.name))
    env.update(overrides)
    return env


def test_serve_refuses_to_start_on_a_missing_bucket_in_one_line(target, space, tmp_path):
    env = _serve_env(target.settings(space.prefix), DOCKYARD_STORAGE_S3_BUCKET="no-such-bucket-dockyard")
    env["DOCKYARD_STORAGE_ROOT"] = str(tmp_path / "root")      # (--storage would mean the filesystem)
    done = subprocess.run([sys.executable, "-m", "puller", "serve", "--host", "127.0.0.1", "--port", "0"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[-1].startswith("dockyard serve: storage.s3.bucket: no bucket 'no-such-bucket-dockyard'"), lines
    assert "Traceback" not in done.stderr and "dockyard-test-secret" not in done.stderr


def test_serve_on_s3_pushes_pulls_and_redirects_to_a_presigned_url(target, space, tmp_path):
    """`dockyard serve` configured through the environment: a blob pushed in
    two chunks is served back, and with storage.redirect a GET answers 307
    to a presigned URL that gives the bytes (HEAD never redirects)."""
    from tests.support.launch import launch_dockyard

    blob = os.urandom(6 * MIB + 7)
    digest = sha256_digest(blob)
    for redirect in ("false", "true"):
        env = _serve_env(target.settings(space.prefix), DOCKYARD_STORAGE_REDIRECT=redirect)
        server = launch_dockyard(config={"storage": {"root": str(tmp_path / f"root-{redirect}")}}, env=env,
                                 log_path=tmp_path / f"log-{redirect}")
        try:
            base = server.url

            def request(method: str, url: str, data: bytes | None = None, headers: dict | None = None):
                req = urllib.request.Request(url if url.startswith("http") else base + url, data=data,
                                             method=method, headers=headers or {})

                class NoRedirect(urllib.request.HTTPRedirectHandler):
                    def redirect_request(self, *args, **kwargs):
                        return None

                try:
                    with urllib.request.build_opener(NoRedirect).open(req, timeout=60) as resp:
                        return resp.status, dict(resp.headers), resp.read()
                except urllib.error.HTTPError as err:
                    return err.code, dict(err.headers), err.read()

            if redirect == "false":
                status, headers, _ = request("POST", "/v2/s3/serve/blobs/uploads/")
                assert status == 202, status
                location = headers["Location"]
                half = len(blob) // 2
                status, headers, _ = request("PATCH", location, blob[:half], {
                    "Content-Type": "application/octet-stream", "Content-Range": f"0-{half - 1}"})
                assert status == 202
                location = headers["Location"]
                sep = "&" if "?" in location else "?"
                status, _, _ = request("PUT", f"{location}{sep}digest={digest}", blob[half:], {
                    "Content-Type": "application/octet-stream", "Content-Range": f"{half}-{len(blob) - 1}"})
                assert status == 201
                status, _, body = request("GET", f"/v2/s3/serve/blobs/{digest}")
                assert (status, body) == (200, blob)
            else:
                status, headers, _ = request("GET", f"/v2/s3/serve/blobs/{digest}")
                assert status == 307, status
                status, _, body = request("GET", headers["Location"])   # from S3, not the registry
                assert (status, body) == (200, blob)
                status, headers, _ = request("HEAD", f"/v2/s3/serve/blobs/{digest}")
                assert status == 200 and int(headers["Content-Length"]) == len(blob)
        finally:
            server.stop()


async def test_backend_errors_are_one_line_storage_errors_without_secrets(target, space):
    """NoSuchKey is PathNotFound; a missing bucket, an unreachable endpoint,
    any other answer a StorageError of one line naming the path, with
    neither key nor secret in it (`raise ... from` keeps the botocore error)."""
    from storage.driver import StorageError
    from storage.s3.client import client_config, make_client

    base = target.settings(space.prefix)
    missing = S3Driver(dataclasses.replace(base, bucket="no-such-bucket-dockyard"))
    down = dataclasses.replace(base, endpoint_url="http://user:pw@127.0.0.1:9")
    unreachable = S3Driver(down, client=make_client(down, client_config(down, attempts=1, connect_timeout=2)))
    try:
        for driver, expected in ((missing, "S3 bucket 'no-such-bucket-dockyard' does not exist"),
                                 (unreachable, "S3 endpoint did not answer get_object of /a/b")):
            with pytest.raises(StorageError) as err:
                await driver.get_content("/a/b")
            message = str(err.value)
            assert not isinstance(err.value, PathNotFound)
            assert expected in message and "\n" not in message and err.value.__cause__ is not None
            for secret in (base.secret_access_key, base.access_key_id, "pw"):
                assert secret not in message
        assert "pw" not in str(await _check_message(unreachable))
    finally:
        await missing.close()
        await unreachable.close()


async def _check_message(driver) -> str:
    with pytest.raises(StorageConfigError) as err:
        await driver.check()
    return str(err.value)
