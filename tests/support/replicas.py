"""Several `dockyard serve` processes over one storage, and the round-robin
proxy in front of them: Dockyard scaled out as users run it, on loopback.

    storage = s3_storage(ceph.endpoint, "registry", prefix="run-1", access_key=..., secret_key=...)
    with ReplicaSet(storage, tmp_path) as replicas:      # two replicas and a proxy
        replicas.urls                                    # each replica's base URL
        replicas.proxy.url                               # one URL, each request to the next replica

`storage` is the settings' `storage:` section (the keys of storage.config):
`filesystem_storage(root)` for one filesystem root shared by every replica
(the NFS case), `s3_storage(...)` for one bucket (and key prefix). Every
replica gets the same settings file, so they differ in nothing but their
port and their log.

As a program, for the OCI conformance suite and for trying things by hand:

    python -m tests.support.replicas [--ceph DIR | --s3-endpoint URL ... | --moto | --filesystem DIR]
                                     [--replicas 2] [--port 0]

starts the storage (a private Ceph cluster with its RADOS Gateway by
default), the replicas and the proxy, prints `proxy: http://127.0.0.1:PORT`
(and `replica: URL` lines before it), and runs until SIGTERM or SIGINT,
then stops everything it started. DOCKYARD_* settings in its environment
reach every replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from tests.support.launch import RegistryServer, launch_dockyard
from tests.support.rrproxy import RoundRobinProxy

S3_PART_SIZE = 5 << 20      # S3's smallest part: multipart paths are reached by small test blobs


def filesystem_storage(root: str | Path) -> dict[str, Any]:
    """The `storage:` section of replicas sharing one filesystem root."""
    return {"driver": "filesystem", "root": str(root)}


def s3_storage(endpoint: str, bucket: str, *, access_key: str, secret_key: str, prefix: str = "",
               region: str = "us-east-1", part_size: int = S3_PART_SIZE, **more: Any) -> dict[str, Any]:
    """The `storage:` section of replicas sharing one S3 bucket (and prefix)."""
    return {"driver": "s3", "s3": {"bucket": bucket, "prefix": prefix, "region": region,
                                   "endpoint_url": endpoint, "access_key_id": access_key,
                                   "secret_access_key": secret_key, "addressing_style": "path",
                                   "part_size": part_size, **more}}


# The registered storage drivers replicas can share (tests.support.drivers):
# one filesystem root, or one bucket of an S3 registered there. By default
# the replica tests run on a shared root (the NFS case) and on the real S3,
# Ceph's RADOS Gateway; moto checks too little (no signatures, no part
# minimum) to stand for a bucket two processes share.
BACKENDS = ("filesystem", "s3-moto", "s3-ceph")
DEFAULT_BACKENDS = ("filesystem", "s3-ceph")


def backend_names() -> list[str]:
    """The BACKENDS a test run covers: DEFAULT_BACKENDS, or those that
    DOCKYARD_TEST_DRIVERS names (as for every storage test)."""
    from tests.support.drivers import SELECT_ENV, driver_names

    if not os.environ.get(SELECT_ENV, "").strip():
        return list(DEFAULT_BACKENDS)
    covered = driver_names()
    return [name for name in BACKENDS if name in covered]


@contextlib.contextmanager
def backend_storage(name: str, scratch: str | Path) -> Iterator[dict[str, Any]]:
    """The `storage:` section of a fresh space on backend `name` (a new
    root under scratch, or a random prefix in the registered bucket),
    emptied afterwards."""
    if name == "filesystem":
        root = Path(scratch) / f"shared-{secrets.token_hex(4)}"
        root.mkdir(parents=True)
        yield filesystem_storage(root)
        return
    from tests.support.s3 import s3_target

    target = s3_target(name)
    prefix = f"dy-replicas-{secrets.token_hex(6)}"
    try:
        yield s3_storage(target.endpoint, target.bucket, prefix=prefix, region=target.region,
                         access_key=target.access_key, secret_key=target.secret_key)
    finally:
        asyncio.run(target.cleanup(prefix, Path(scratch)))


def open_storage_driver(storage: Mapping[str, Any]):
    """A storage driver on the same storage as the replicas (to look at what they stored)."""
    from storage.config import FilesystemSettings, S3Settings, StorageSettings, open_driver

    s3 = S3Settings(**storage.get("s3", {}))
    return open_driver(StorageSettings(driver=storage["driver"], root=storage.get("root", ""), s3=s3,
                                       filesystem=FilesystemSettings()))


def start_replicas(storage: Mapping[str, Any], workdir: str | Path, count: int = 2, *,
                   settings: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                   timeout: float = 60.0) -> list[RegistryServer]:
    """`count` replicas on free loopback ports over `storage`; files (settings,
    logs, the unused roots of S3 replicas) under workdir. All or none: one
    that does not start stops the others."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = {**dict(settings or {}), "storage": dict(storage)}
    servers: list[RegistryServer] = []
    try:
        for n in range(count):
            # The root goes in the file, not as --storage (which means the
            # filesystem driver); S3 replicas get one each, never used.
            root = storage["root"] if storage.get("driver") == "filesystem" else workdir / f"replica-{n}"
            Path(root).mkdir(parents=True, exist_ok=True)
            replica_config = {**config, "storage": {**config["storage"], "root": str(root)}}
            config_file = workdir / f"replica-{n}.yml"
            config_file.write_text(yaml.safe_dump(replica_config, sort_keys=False))
            servers.append(launch_dockyard(config=config_file, env=env, log_path=workdir / f"replica-{n}.log",
                                           timeout=timeout))
    except BaseException:
        stop_all(servers)
        raise
    return servers


def stop_all(servers: Sequence[RegistryServer]) -> None:
    for server in reversed(servers):
        server.stop()


class ReplicaSet:
    """Replicas over one storage and a round-robin proxy in front of them."""

    def __init__(self, storage: Mapping[str, Any], workdir: str | Path, count: int = 2, *,
                 settings: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                 proxy_port: int = 0):
        self.storage = dict(storage)
        self.workdir = Path(workdir)
        self.count = count
        self.settings = settings
        self.env = env
        self.proxy_port = proxy_port
        self.servers: list[RegistryServer] = []
        self.proxy: RoundRobinProxy | None = None

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def hosts(self) -> list[str]:
        return [server.host for server in self.servers]

    def start(self) -> "ReplicaSet":
        self.servers = start_replicas(self.storage, self.workdir, self.count, settings=self.settings,
                                      env=self.env)
        try:
            self.proxy = RoundRobinProxy(self.hosts, self.proxy_port).start()
        except BaseException:
            self.stop()
            raise
        return self

    def logs(self) -> str:
        return "\n".join(f"--- {server.url} ---\n{server.log()[-4000:]}" for server in self.servers)

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        stop_all(self.servers)
        self.servers = []

    def __enter__(self) -> "ReplicaSet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the program -------------------------------------------------------------------------

def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.support.replicas", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--ceph", metavar="DIR", help="start a private Ceph cluster under DIR (the default, "
                                                     "in a temporary directory)")
    where.add_argument("--s3-endpoint", metavar="URL", help="an S3 endpoint that is already running")
    where.add_argument("--filesystem", metavar="DIR", help="one filesystem root shared by the replicas")
    where.add_argument("--moto", action="store_true", help="moto's S3 server (checks no signatures)")
    parser.add_argument("--s3-bucket", default="dockyard-replicas")
    parser.add_argument("--s3-prefix", default="", help="key prefix (default: a random one)")
    parser.add_argument("--s3-access-key", default="")
    parser.add_argument("--s3-secret-key", default="")
    parser.add_argument("--s3-region", default="us-east-1")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=0, help="the proxy's port (default: a free one)")
    parser.add_argument("--workdir", help="settings and logs (default: a temporary directory, removed at the end)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    with tempfile.TemporaryDirectory(prefix="dy-replicas-") as scratch:
        workdir = Path(args.workdir or scratch)
        ceph = None
        prefix = args.s3_prefix or f"replicas-{secrets.token_hex(4)}"
        try:
            if args.filesystem:
                storage = filesystem_storage(Path(args.filesystem).resolve())
            elif args.s3_endpoint:
                storage = s3_storage(args.s3_endpoint, args.s3_bucket, prefix=prefix, region=args.s3_region,
                                     access_key=args.s3_access_key, secret_key=args.s3_secret_key)
            elif args.moto:
                from tests.support.s3 import S3Target, moto_endpoint

                target = S3Target(moto_endpoint, "moto", "moto-secret", args.s3_bucket, args.s3_region)
                storage = s3_storage(target.endpoint, args.s3_bucket, prefix=prefix, region=args.s3_region,
                                     access_key=target.access_key, secret_key=target.secret_key)
            else:
                from tests.support.ceph import start_ceph_s3

                ceph = start_ceph_s3(Path(args.ceph or workdir / "ceph"), buckets=[args.s3_bucket])
                storage = s3_storage(ceph.endpoint, args.s3_bucket, prefix=prefix, region=ceph.region,
                                     access_key=ceph.access_key, secret_key=ceph.secret_key)
                print(f"ceph: {ceph.endpoint} bucket {args.s3_bucket}", flush=True)
            replicas = ReplicaSet(storage, workdir, args.replicas, proxy_port=args.port).start()
        except BaseException as exc:
            if ceph is not None:
                ceph.stop()
            print(f"replicas did not start: {exc}", file=sys.stderr)
            return 2
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
        try:
            for url in replicas.urls:
                print(f"replica: {url}", flush=True)
            print(f"proxy: {replicas.proxy.url}", flush=True)
            while not stopping.wait(1.0):
                if not all(server.server.running() for server in replicas.servers):
                    print("a replica exited:\n" + replicas.logs(), file=sys.stderr)
                    return 1
            print(f"requests per replica: {replicas.proxy.served}", flush=True)
            return 0
        finally:
            replicas.stop()
            if ceph is not None:
                ceph.stop()


if __name__ == "__main__":
    sys.exit(main())
