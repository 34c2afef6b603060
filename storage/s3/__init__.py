"""The S3 storage driver: AWS S3 or any S3-compatible service (Ceph RGW,
MinIO), through boto3.

Calls. One boto3 client per driver (one per process in the registry),
SigV4, path-style or virtual-host addressing (`storage.s3.addressing_style`;
"auto" is path-style when `endpoint_url` is set), standard retries with
backoff for throttling, 5xx and broken connections. Every call runs in the
driver's own thread pool, as many threads as the client has connections
(`storage.s3.max_connections`): nothing blocks the event loop.
`storage.s3.client` holds the client and maps every botocore error to a
typed storage error, one line, no credentials.

Keys. Driver path "/a/b" is the key `prefix + "a/b"` (the prefix "" or
ending in "/"). Directories are prefixes: `list` is ListObjectsV2 with
Delimiter "/" over every page, `stat` of a prefix with objects under it is
a directory, `delete` of a directory deletes every object under it
(DeleteObjects, 1,000 keys a request) and aborts every multipart upload
under it. The driver's own objects have hidden names (the contract's
HIDDEN_PREFIX, so `list` never shows them and no caller can name them):

    <dir>/.dockyard-tmp-lock.<name>  the lock named <dir>/<name> (storage.s3.locks)
    <dir>/.dockyard-tmp-dir          a directory emptied by a delete stays, listed
                                     empty, as it would on a filesystem

Writes. `put_content` is one PUT. A writer (`writer(path, append)`, used by
upload sessions: one writer per request, append=True, committed at the end
of each request, possibly in another process each time) works like this:

- less than one part in total: the bytes go up in one PutObject on commit,
  never a multipart upload (a small blob, a small chunk of a small upload:
  the file so far, under a part, is read back and rewritten whole);
- more: each full part goes up as it fills (UploadPart, two in flight; a
  part past 64 MiB is filled in a temporary file, not in memory), and
  commit stores the upload's state, the part list with ETags and sizes and
  the tail under a part, in the object at the file's key, with one
  conditional PUT (If-Match the state the writer continued). The bytes under
  a part live in the bucket between requests, not in any process; the next
  writer, in any process, reads the state and continues the same multipart
  upload (storage.s3.multipart documents the format). `stat` answers the
  size from the state object's metadata (HEAD);
- what a writer keeps reaches the bucket when it commits or closes, not as
  it comes: a stat or read in the same process waits (up to a second) for a
  writer of that path still open, so a status asked right after a client
  broke off a chunk sees what the broken request kept;
- a whole object of a part or more that is appended to again is continued
  on the server: a new multipart upload whose first parts are UploadPartCopy
  ranges of it;
- the first read or `move` of a pending file completes its upload (the tail
  as the last part), so readers and the content-addressed copy only ever see
  whole objects, and CompleteMultipartUpload makes them appear atomically;
- `cancel()` aborts the upload and deletes the state; deleting the file or
  its directory aborts it too; `reclaim_leftovers` aborts uploads a dead
  writer started that no file names.

Part sizes. Part n (1-based) is `part_size * 2 ** ((n - 1) // 1000)`, at
most 5 GiB, and parts 9,001-10,000 are 5 GiB (`multipart.part_size_for`):
with the default 16 MiB the first 1,000 parts hold 15.6 GiB, and with any
base 10,000 parts hold more than S3's 5 TiB object limit, so no blob S3
can store is refused. Part numbers go on across requests, so the rule
holds for an upload made of many chunks too.

Moves. `move` is a server-side CopyObject (a multipart copy of 1 GiB
UploadPartCopy pieces above 5 GiB), conditional on the source's ETag, then
a delete of the source.

Direct commits: `atomic_writer(path)` (storage.s3.whole) writes a new
object that shows nothing before commit: one PUT under a part, else a
multipart upload at the path's own key completed at commit. The content
store uses it for a blob whose digest is known before its first byte, so
the bytes land at the blob's key after they hashed to its name, with no
staged object and no copy.

Conditions: every If-Match sends the ETag bare, without quotes
(`client.bare`: the one form Ceph RGW, AWS and moto all match).

Locks: see storage.s3.locks (a lease in a hidden object, taken with
If-None-Match: *, renewed with If-Match while held, taken over with If-Match
once its holder stopped renewing it).

Direct access: `url_for` presigns a GET (or HEAD) for
`storage.s3.presign_expires` seconds; `open_local` is always None.

Storage class and encryption: `storage.s3.storage_class` on objects of 128
KiB or more (blobs; links and tags keep the bucket's default),
`storage.s3.sse` on every object the driver writes, its state and locks
included.

Known differences from the filesystem driver: a lock whose holder died is
free once its lease runs out (10 s), not at once as with flock; a directory
emptied by a `move` of its last file disappears (only `delete` keeps it);
`url_for` presigns without looking, so it must name a whole object (the
content store only asks for blobs, which are); and S3 keys may hold a file
and a directory of the same name at once, which this driver never creates.
"""

from storage.s3.driver import S3Driver
from storage.s3.multipart import max_object_size, part_size_for

__all__ = ["S3Driver", "max_object_size", "part_size_for"]
