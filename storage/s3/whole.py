"""New whole objects whose bytes appear at commit only (`S3Driver.atomic_writer`):
for content that is checked while it streams (a blob hashed on its way in)
and must not be seen before the check passed.

Under one part the bytes go up in one PUT at commit. Beyond, they go into
a multipart upload at the object's own key, each part as it fills (the
writer's part machinery, storage.s3.multipart), and commit completes it
there: S3 shows nothing of an upload before CompleteMultipartUpload, which
makes the whole object appear at once. So the key keeps its old content
(or nothing) until commit, no server-side copy follows, and a cancelled
writer aborts its upload. A writer that dies leaves only an upload no
pending file names, which `reclaim_leftovers` aborts.
"""

from __future__ import annotations

from storage.s3.client import S3Calls
from storage.s3.multipart import Part, S3Writer, _PartBuffer


class AtomicWriter(S3Writer):
    """An S3Writer of a new object that keeps no state between requests:
    commit puts or completes the object, close and cancel discard it."""

    @classmethod
    def new(cls, calls: S3Calls, path: str, base: int) -> "AtomicWriter":
        return cls(calls, path, calls.key(path), base)

    async def _persist(self, parts: list[Part] | None) -> None:
        calls = self._calls
        if self._upload_id is None:
            await calls.call("put_object", self._path, Key=self._key, Body=self._buf.body(),
                             **calls.content_args(self._buf.size))
        else:
            if self._buf.size:
                # the tail is the last part, which S3 lets be under 5 MiB
                number, buf = self._next, self._buf
                self._next += 1
                self._buf = _PartBuffer()
                await self._upload_part(number, buf)
            chosen = sorted(self._parts.values(), key=lambda p: p.number)
            # Ceph may answer with an empty ETag: the answer is not needed.
            await calls.call("complete_multipart_upload", self._path, Key=self._key, UploadId=self._upload_id,
                             MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in chosen]})
        self._buf.close()

    async def close(self) -> None:
        await self.cancel()          # nothing uncommitted is kept

    async def cancel(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._settle()
            self._buf.close()
            if self._upload_id is not None:
                await self._calls.abort(self._path, self._key, self._upload_id)
        finally:
            self._done()
