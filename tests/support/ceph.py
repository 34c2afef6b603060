"""A throwaway Ceph cluster serving S3 through its RADOS Gateway, on loopback.

    with start_ceph_s3(tmp_path / "ceph", buckets=["registry"]) as ceph:
        s3 = ceph.client()                 # boto3, SigV4, path-style, ceph's keys
        s3.put_object(Bucket="registry", Key="k", Body=b"v")

Unlike an S3 emulator, the gateway checks every request's signature (SigV4,
SigV2, presigned URLs), enforces the 5 MiB minimum multipart part and answers
conditional requests, as AWS does; it also has Ceph's own small quirks, which
is the point: a driver that passes here tolerates S3-compatible stores.

What runs, each a child process leading a process group of its own
(`tests.support.launch.ServerProcess`), bound to 127.0.0.1 only, with every
file (settings, monitor store, OSD data, sockets, logs) under `directory`:

    ceph-mon    one monitor (msgr2 only, on a free port)
    ceph-osd    one OSD: objects in its memory (memstore, the default) or in
                BlueStore on a sparse file under `directory` (store="bluestore")
    radosgw     the S3 endpoint (beast on 127.0.0.1:PORT), path-style only

Inside the cluster authentication is off (no cephx keys to make); S3 requests
are still authenticated against the one gateway user's keys. There is no
ceph-mgr: nothing the gateway does needs one, and no lifecycle worker (rules
are stored, never applied). `stop()` ends exactly these processes, by process
group, and nothing of the cluster is left running; a small watchdog process
ends them too if the test process dies without stopping them (SIGKILL,
SIGTERM: no atexit handler runs then).

Start and memory, measured on 2 cores: memstore about 2.2 s to a created
bucket, stop under 1 s (BlueStore: 9.5 s, its mkfs and first mount being
most of it). Idle, the three daemons take about 130 MiB. The memstore OSD
keeps about twice what is stored in memory, bounded by `capacity` (default
2 GiB: about 4.4 GiB in all at worst); deleted objects' data goes to the gateway's
garbage collector, which frees it about a minute later. Past `capacity` the
OSD is full and writes wait (they do not fail). BlueStore keeps the data on
disk with a fixed 128 MiB cache (about 230 MiB in all after 256 MiB of
objects): use it where much data lives at once.

`pause()` / `resume()` take the S3 endpoint away and give it back, for fault
tests: "freeze" (SIGSTOP: connections hang, as with a stuck server) or
"down" (radosgw stopped: connections are refused).

Ceph comes from Debian's packages (ceph-mon, ceph-osd, radosgw, ceph-common);
without them the calling test is skipped, or fails under
DOCKYARD_REQUIRE_INTEROP=1 (`tests.support.peers.missing_peer`).

What this Ceph (16.2) does, checked by hand against boto3 1.44 (what a
driver must tolerate is marked *):
- signatures: a wrong secret key gets 403 SignatureDoesNotMatch, an unknown
  access key 403 InvalidAccessKeyId; a tampered presigned URL 403
  SignatureDoesNotMatch, an expired one 403 AccessDenied.
- multipart: a non-final part under 5 MiB fails the completion with 400
  EntityTooSmall. *CompleteMultipartUpload answers an empty ETag (HEAD has
  the real one); completing it again answers 200 with the ETag unquoted.
  *ListParts of an aborted upload is 404 NoSuchKey (UploadPart: NoSuchUpload).
- *CopyObject and UploadPartCopy answer unquoted ETags.
- conditional writes: PUT with If-None-Match: * on an existing key is 412
  PreconditionFailed. *If-Match is compared with the unquoted ETag (the
  quoted one AWS clients send is 412 even when it matches); If-None-Match
  with an ETag is ignored, and so is If-None-Match on CompleteMultipartUpload
  and CopyObject (they overwrite). Conditional GETs answer 304 and 412.
- checksums: a wrong Content-MD5 is 400 BadDigest; *x-amz-checksum-* headers
  are accepted unchecked; boto3's default request checksums work.
- *DeleteObjects racing a PUT of the same key can answer 200 with that key
  in Errors, Code "UnknownError" (DeleteObject alone does not).
- storage classes: STANDARD and STANDARD_IA (which the launcher defines);
  any other is 400 InvalidArgument.
- *encryption: SSE-S3 (AES256) over plain HTTP is 400 InvalidRequest (with
  "rgw crypt require ssl" off it is accepted and silently not applied: 16.2
  has no SSE-S3). SSE-KMS works with the "testing" key backend
  (settings={"client.rgw": {"rgw crypt s3 kms backend": "testing", "rgw crypt
  s3 kms encryption keys": "KEYID=BASE64-256-BIT-KEY", "rgw crypt require
  ssl": "false"}}), except that CopyObject of an encrypted object is 501
  NotImplemented.

`shared_ceph` is the test session's one cluster, started on first use (the
`ceph_s3` fixture and the "s3-ceph" storage driver both take it from there).
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Mapping, Sequence

from tests.support.launch import ServerProcess, free_port, http_status
from tests.support.peers import missing_peer

# The Debian packages behind each program the launcher runs.
PROGRAMS = {
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
    "radosgw": "radosgw",
    "radosgw-admin": "ceph-common",
    "ceph": "ceph-common",
    "monmaptool": "ceph-base",      # a dependency of ceph-mon and ceph-osd
}
DEBIAN_PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common")

ACCESS_KEY = "DOCKYARDCEPHTESTKEY1"
SECRET_KEY = "dockyard/ceph/test/secret/key/not/a/secret"
REGION = "us-east-1"                # no LocationConstraint: the default zonegroup takes the bucket
S3_USER = "dockyard"
# Storage classes the gateway accepts besides STANDARD (all in the one data
# pool); any other class is refused with 400 InvalidArgument.
STORAGE_CLASSES = ("STANDARD_IA",)

STORES = ("memstore", "bluestore")
MiB = 1 << 20
GiB = 1 << 30


def _program(name: str) -> str | None:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    return shutil.which(name, path=search)


def ceph_programs() -> dict[str, str]:
    """Absolute paths of the Ceph programs, or skip/fail the running test
    naming the Debian packages that are missing."""
    found = {name: _program(name) for name in PROGRAMS}
    missing = sorted({PROGRAMS[name] for name, path in found.items() if path is None})
    if missing:
        missing_peer(f"Ceph is not installed: Debian packages {', '.join(missing)} missing "
                     f"(tests/run.sh installs them as root)")
    return found  # type: ignore[return-value]


# ---- settings ---------------------------------------------------------------------

def _settings(directory: Path, *, fsid: str, mon_port: int, port: int, store: str,
              capacity: int) -> dict[str, dict[str, object]]:
    d = directory
    return {
        "global": {
            "fsid": fsid,
            # msgr2 only, loopback only: no legacy port 6789, no IPv6, OSD ports on 127.0.0.1
            "mon host": f"v2:127.0.0.1:{mon_port}",
            "public addr": "127.0.0.1",
            "cluster addr": "127.0.0.1",
            "ms bind msgr1": "false",
            "ms bind ipv6": "false",
            # no cephx inside the cluster (the gateway still checks S3 signatures)
            "auth cluster required": "none",
            "auth service required": "none",
            "auth client required": "none",
            # every file under the directory, nothing in /var or /etc
            "run dir": d / "run",
            "pid file": d / "run" / "$name.pid",
            "crash dir": d / "crash",
            "log file": d / "log" / "$name.log",
            "mon cluster log file": d / "log" / "cluster.log",
            "log to stderr": "false",
            "err to stderr": "true",
            # one OSD: one copy of everything, replicas chosen among OSDs (not hosts),
            # few placement groups (fast to create and peer), no autoscaler (no mgr)
            "osd pool default size": 1,
            "osd pool default min size": 1,
            "osd pool default pg num": 8,
            "osd pool default pgp num": 8,
            "osd pool default pg autoscale mode": "off",
            "osd crush chooseleaf type": 0,
            "mon allow pool size one": "true",
            "mon warn on pool no redundancy": "false",
            # a nearly full disk must not stop a throwaway monitor from starting
            "mon data avail crit": 0,
            # the gateway's first start creates its pools one map change at a time:
            # propose changes every 0.1 s instead of every second
            "paxos propose interval": 0.1,
            # a small machine: fewer messenger and OSD worker threads
            "ms async op threads": 2,
        },
        "mon": {
            "mon data": d / "mon" / "$name",
        },
        "osd": {
            "osd data": d / "osd" / "$id",
            "osd objectstore": store,
            "memstore device bytes": capacity,
            "bluestore block path": d / "osd" / "block.$id",
            "bluestore block create": "true",
            "bluestore block size": capacity,
            # a fixed cache, not one grown towards the 4 GiB osd_memory_target
            "bluestore cache autotune": "false",
            "bluestore cache size": 128 * MiB,
            "osd op num shards": 2,
            "osd op num threads per shard": 1,
        },
        "client.rgw": {
            # radosgw asks for an encrypted monitor session by default, which needs cephx
            "ms mon client mode": "crc",
            "rgw data": d / "rgw",
            # tcp_nodelay: without it every GET and LIST answer waits ~40 ms for a delayed ACK
            "rgw frontends": f"beast endpoint=127.0.0.1:{port} tcp_nodelay=1",
            # 32 requests at a time (not 512 threads); no usage or ops logs, no
            # background resharding of bucket indexes
            "rgw thread pool size": 32,
            "rgw enable usage log": "false",
            "rgw enable ops log": "false",
            "rgw dynamic resharding": "false",
            # no lifecycle worker: it sleeps 5 s at a time, which a stopping gateway waits out
            "rgw enable lc threads": "false",
            # deleted objects' data is reclaimed within a minute, not after two hours
            "rgw gc obj min wait": 30,
            "rgw gc processor period": 30,
        },
    }


def _render(settings: dict[str, dict[str, object]]) -> str:
    lines = []
    for section, options in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in options.items()]
        lines.append("")
    return "\n".join(lines)


def _port_busy(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _rss(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses (host, port) process `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:       # 0A: LISTEN
                continue
            host_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(host_hex)       # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return found


def processes_under(directory: Path) -> list[int]:
    """PIDs of the processes whose command line names a file under `directory`
    (every process of a cluster there names its settings file)."""
    needle = str(Path(directory).resolve()).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry.name))
    return pids


# Run beside every cluster: when the process that started the cluster dies
# without stopping it (SIGKILL, SIGTERM, a crash: no atexit), SIGKILL every
# process whose command line names the cluster's settings file. The daemons
# lead sessions of their own, so nothing else would end them.
_WATCHDOG = """
import os, select, signal, sys, time
parent, needle = int(sys.argv[1]), os.fsencode(sys.argv[2])
try:
    select.select([os.pidfd_open(parent)], [], [])
except ProcessLookupError:
    pass
except OSError:                 # no pidfd (Linux before 5.3): look twice a second
    while os.path.exists(f"/proc/{parent}"):
        time.sleep(0.5)
for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if needle in cmdline.read():
                    os.kill(int(entry), signal.SIGKILL)
        except OSError:
            pass
"""


# ---- the cluster --------------------------------------------------------------------

class CephS3:
    """A running single-node Ceph cluster and its S3 endpoint (see the module docstring).

    `endpoint`, `access_key`, `secret_key`, `region` are what an S3 client
    needs; `client()` is such a client (boto3). `timings` holds how long each
    step of the start took, in seconds.
    """

    def __init__(self, directory: Path, *, port: int, mon_port: int, store: str, programs: dict[str, str]):
        self.directory = directory
        self.port = port
        self.mon_port = mon_port
        self.store = store
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.conf = directory / "ceph.conf"
        self.timings: dict[str, float] = {}
        self._programs = programs
        self._daemons: dict[str, ServerProcess] = {}
        self._paused: str | None = None
        self._stopped = False
        self._lock = threading.RLock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- S3 ---------------------------------------------------------------------------

    def client(self, *, access_key: str | None = None, secret_key: str | None = None, **config):
        """A boto3 S3 client on this endpoint: SigV4, path-style addressing,
        no retries (a refused request is seen as it is); keys and botocore
        Config options may be overridden."""
        import boto3
        from botocore.config import Config

        options = {"signature_version": "s3v4", "s3": {"addressing_style": "path"},
                   "retries": {"max_attempts": 1, "mode": "standard"},
                   "connect_timeout": 5, "read_timeout": 60, **config}
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key,
                            config=Config(**options))

    def create_bucket(self, name: str) -> None:
        """Create a bucket (SigV4); an existing bucket of ours is left as it is."""
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass

    # -- the processes ----------------------------------------------------------------

    def _daemon(self, name: str, *args: str) -> ServerProcess:
        argv = [self._programs[args[0]], "-f", "-c", str(self.conf), *args[1:]]
        process = ServerProcess(argv, env={"CEPH_ARGS": "", "CEPH_CONF": str(self.conf)},
                                cwd=self.directory, log_path=self.directory / "log" / f"{name}.out",
                                name=name, grace=10)
        self._daemons[name] = process
        process.start()         # no readiness check here: the caller waits for what it needs
        return process

    def _tool(self, *argv: str, timeout: float = 60) -> str:
        """Run a Ceph command-line tool against this cluster; its stdout."""
        program, *args = argv
        command = [self._programs[program], "-c", str(self.conf), *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, cwd=self.directory,
                                  env={**os.environ, "CEPH_ARGS": "", "CEPH_CONF": str(self.conf)})
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(command)} did not finish within {timeout:.0f}s\n"
                               f"{self.log(tail=3000)}") from None
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed with {done.returncode}:\n"
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}\n{self.log(tail=3000)}")
        return done.stdout

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        """Wait until ready(); RuntimeError with the logs as soon as a daemon exits
        or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not ready():
            for name, process in self._daemons.items():
                if not process.running():
                    raise RuntimeError(f"ceph: {name} exited ({process.proc.returncode}) while "
                                       f"waiting for {what}\n{self.log(tail=4000)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ceph: {what} not ready within {timeout:.0f}s\n{self.log(tail=4000)}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            http_status(self.endpoint + "/", timeout=2)
            return True
        except OSError:
            return False

    def _start_watchdog(self) -> None:
        process = ServerProcess([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.conf)],
                                cwd=self.directory, log_path=self.directory / "log" / "watchdog.out",
                                name="watchdog", grace=5)
        self._daemons["watchdog"] = process
        process.start()

    def pids(self) -> dict[str, int]:
        """The running processes' IDs, by name (mon, osd, rgw, and the watchdog
        that ends them if the process that started them dies first)."""
        return {name: p.pid for name, p in self._daemons.items() if p.running()}

    def listening(self) -> dict[str, set[tuple[str, int]]]:
        """The TCP addresses each running daemon listens on, by name."""
        return {name: listening_addresses(pid) for name, pid in self.pids().items()}

    def rss(self) -> dict[str, int]:
        """Resident memory of each running daemon, in bytes."""
        return {name: _rss(pid) for name, pid in self.pids().items()}

    def log(self, tail: int | None = 20000) -> str:
        """The cluster's logs (daemon output and Ceph's own log files), each
        file's last `tail` characters (None: whole files)."""
        parts = []
        for path in sorted((self.directory / "log").glob("*")):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if tail is not None and len(text) > tail:
                text = "[...]\n" + text[-tail:]
            parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts)

    # -- faults -----------------------------------------------------------------------

    @property
    def paused(self) -> str | None:
        """None, "freeze" or "down"."""
        return self._paused

    def pause(self, how: str = "freeze") -> None:
        """Take the S3 endpoint away: "freeze" stops radosgw with SIGSTOP
        (connections are accepted and then nothing answers: requests time out),
        "down" stops radosgw (connections are refused). The rest of the
        cluster keeps running; `resume()` brings the endpoint back."""
        if how not in ("freeze", "down"):
            raise ValueError(f"pause(how=) is 'freeze' or 'down', not {how!r}")
        with self._lock:
            if self._paused is not None:
                raise RuntimeError(f"the gateway is already paused ({self._paused})")
            rgw = self._daemons["rgw"]
            if how == "freeze":
                os.killpg(rgw.pid, signal.SIGSTOP)
            else:
                rgw.stop()
            self._paused = how

    def resume(self, timeout: float = 60) -> None:
        """Bring the S3 endpoint back after `pause()`; returns once it answers."""
        with self._lock:
            how, self._paused = self._paused, None
            if how == "freeze":
                os.killpg(self._daemons["rgw"].pid, signal.SIGCONT)
            elif how == "down":
                started = time.monotonic()
                self._daemon("rgw", "radosgw", "-n", "client.rgw")
                self._wait(f"radosgw on {self.endpoint}", self._answers, timeout)
                self.timings["rgw restart"] = time.monotonic() - started

    # -- stopping ---------------------------------------------------------------------

    def stop(self) -> None:
        """End every daemon of the cluster (the gateway first, the monitor last),
        each by its process group: SIGTERM, SIGKILL after a grace period.
        Idempotent. The files stay under `directory` (logs for a failed test)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            started = time.monotonic()
            if self._paused == "freeze":
                try:
                    os.killpg(self._daemons["rgw"].pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            self._paused = None
            for name in ("rgw", "osd", "mon", "watchdog"):
                process = self._daemons.get(name)
                if process is not None:
                    began = time.monotonic()
                    process.stop()
                    self.timings[f"stop {name}"] = time.monotonic() - began
            self.timings["stop"] = time.monotonic() - started
            _LIVE.discard(self)

    def __enter__(self) -> "CephS3":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<CephS3 {self.endpoint} {self.store} in {self.directory}>"


_LIVE: set[CephS3] = set()


@atexit.register
def _stop_leftovers() -> None:
    """A cluster a test forgot to stop still ends with the interpreter."""
    for cluster in list(_LIVE):
        cluster.stop()


def start_ceph_s3(directory: Path, *, port: int | None = None, buckets: Sequence[str] = (),
                  store: str = "memstore", capacity: int = 2 * GiB,
                  settings: Mapping[str, Mapping[str, object]] | None = None, timeout: float = 120) -> CephS3:
    """Start a fresh single-node Ceph cluster with its S3 gateway on
    127.0.0.1:`port` (default: a free port), everything under `directory`
    (made if missing; it must be empty), one S3 user (`ACCESS_KEY`,
    `SECRET_KEY`) and the given buckets; returns once S3 answers.

    `store`: "memstore" (objects in the OSD's memory; the fastest start) or
    "bluestore" (a sparse file under `directory`); `capacity` bounds either.
    `settings`: more ceph.conf options by section ({"client.rgw": {"debug rgw":
    20}}), laid over the launcher's own.
    Skips (or fails, DOCKYARD_REQUIRE_INTEROP=1) the calling test when Ceph is
    not installed; RuntimeError, with the logs, when it does not start.
    """
    if store not in STORES:
        raise ValueError(f"store must be one of {', '.join(STORES)}, not {store!r}")
    programs = ceph_programs()
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise ValueError(f"{directory} is not empty: a cluster starts in an empty directory")
    port = port or free_port()
    if _port_busy(port):
        raise RuntimeError(f"127.0.0.1:{port} is already in use")
    mon_port = free_port()
    while mon_port == port:
        mon_port = free_port()
    for sub in ("mon/a", "osd/0", "rgw", "log", "run", "crash"):
        (directory / sub).mkdir(parents=True)

    cluster = CephS3(directory, port=port, mon_port=mon_port, store=store, programs=programs)
    fsid = str(uuid.uuid4())
    conf = _settings(directory, fsid=fsid, mon_port=mon_port, port=port, store=store, capacity=capacity)
    for section, options in (settings or {}).items():
        conf.setdefault(section, {}).update(options)
    cluster.conf.write_text(_render(conf))
    _LIVE.add(cluster)
    cluster._start_watchdog()
    clock = time.monotonic()

    def step(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        cluster.timings[name] = now - clock
        clock = now

    began = clock
    try:
        monmap = directory / "monmap"
        subprocess.run([programs["monmaptool"], "--create", "--fsid", fsid,
                        "--addv", "a", f"[v2:127.0.0.1:{mon_port}]", str(monmap)],
                       check=True, capture_output=True, timeout=30)
        cluster._tool("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap))
        step("mon mkfs")
        cluster._daemon("mon", "ceph-mon", "-i", "a")
        cluster._wait("the monitor", lambda: _port_busy(mon_port), timeout)
        step("mon start")
        osd_uuid = str(uuid.uuid4())
        osd_id = cluster._tool("ceph", "--connect-timeout", str(int(timeout)), "osd", "new", osd_uuid,
                               timeout=timeout + 10).strip()
        if osd_id != "0":
            raise RuntimeError(f"ceph: the new OSD got id {osd_id!r}, expected 0")
        step("osd new")
        cluster._tool("ceph-osd", "--mkfs", "-i", "0", "--osd-uuid", osd_uuid)
        step("osd mkfs")
        cluster._daemon("osd", "ceph-osd", "-i", "0")
        # The gateway's zone, user and storage classes, made before it starts
        # (radosgw-admin makes the default zone; it waits for the OSD to be up).
        admin = ("radosgw-admin", "-n", "client.admin")
        cluster._tool(*admin, "user", "create", f"--uid={S3_USER}", f"--display-name={S3_USER}",
                      f"--access-key={ACCESS_KEY}", f"--secret-key={SECRET_KEY}", timeout=timeout)
        step("osd start+user")
        for storage_class in STORAGE_CLASSES:
            cluster._tool(*admin, "zonegroup", "placement", "add", "--rgw-zonegroup=default",
                          "--placement-id=default-placement", f"--storage-class={storage_class}")
            cluster._tool(*admin, "zone", "placement", "add", "--rgw-zone=default",
                          "--placement-id=default-placement", f"--storage-class={storage_class}",
                          "--data-pool=default.rgw.buckets.data")
        step("storage classes")
        cluster._daemon("rgw", "radosgw", "-n", "client.rgw")
        cluster._wait(f"radosgw on {cluster.endpoint}", cluster._answers, timeout)
        step("rgw start")
        for bucket in buckets:
            cluster.create_bucket(bucket)
        step("buckets")
    except BaseException:
        cluster.stop()
        raise
    cluster.timings["start"] = time.monotonic() - began
    return cluster


# ---- the session's cluster ------------------------------------------------------------

SESSION_BUCKET = "dockyard-tests"


class SharedCeph:
    """One cluster for a whole test session, started on first `get()` (from
    any thread), stopped by `stop()`. Without Ceph every caller skips (or
    fails); a start that failed is not tried again: later callers fail at once."""

    def __init__(self, bucket: str = SESSION_BUCKET):
        self.bucket = bucket
        self._lock = threading.Lock()
        self._cluster: CephS3 | None = None
        self._failed: str | None = None
        self._make_directory: Callable[[], Path] | None = None
        self._own_directory: Path | None = None

    def configure(self, make_directory: Callable[[], Path]) -> None:
        """Where a cluster started later lives (called with no arguments, once)."""
        self._make_directory = make_directory

    @property
    def started(self) -> bool:
        return self._cluster is not None

    def get(self) -> CephS3:
        with self._lock:
            if self._cluster is not None:
                return self._cluster
            ceph_programs()             # without Ceph every caller skips (or fails) on its own
            if self._failed is not None:
                raise RuntimeError(f"the session's Ceph did not start earlier: {self._failed}")
            if self._make_directory is not None:
                directory = self._make_directory()
            else:
                directory = self._own_directory = Path(tempfile.mkdtemp(prefix="dy-ceph-"))
            try:
                self._cluster = start_ceph_s3(directory, buckets=[self.bucket])
            except Exception as exc:
                self._failed = (str(exc).splitlines() or [repr(exc)])[0] + f" (logs under {directory})"
                raise
            return self._cluster

    def stop(self) -> None:
        with self._lock:
            cluster, self._cluster = self._cluster, None
            if cluster is not None:
                cluster.stop()
            if self._own_directory is not None:
                shutil.rmtree(self._own_directory, ignore_errors=True)
                self._own_directory = None


shared_ceph = SharedCeph()


def random_bucket_name(prefix: str = "dy") -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


__all__ = ["ACCESS_KEY", "SECRET_KEY", "REGION", "DEBIAN_PACKAGES", "SESSION_BUCKET", "CephS3", "SharedCeph",
           "ceph_programs", "listening_addresses", "processes_under", "random_bucket_name", "shared_ceph",
           "start_ceph_s3"]
