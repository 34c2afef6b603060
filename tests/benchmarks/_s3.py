"""The S3 targets of bench_registry.py: every registry on one local Ceph RADOS Gateway.

One Ceph cluster for the run (tests/support/ceph.py: one monitor, one OSD,
radosgw on 127.0.0.1). For every registry the bench runs (CNCF Distribution,
Dockyard w=N) two processes, blob GET redirect on and off, each in a bucket
of its own, so each pushes into storage that has never seen its blobs:

    Distribution  its own S3 driver (aws-sdk-go): storage.s3 regionendpoint,
                  bucket, accesskey, secretkey, region, secure false, v4auth
                  true (path-style follows from regionendpoint in 2.8);
                  storage.redirect.disable true for "redirect off". Started
                  with AWS_CA_BUNDLE empty: 2.8 cannot apply a CA bundle to
                  its own HTTP transport and panics at start when the
                  variable names one.
    Dockyard      storage.driver s3 (endpoint_url, bucket, region, the keys),
                  storage.redirect true or false.

Everything else is each registry's default: Distribution writes 10 MiB
chunks (chunksize) and Dockyard 16 MiB parts (storage.s3.part_size).

The OSD keeps objects in BlueStore on a sparse file under the work
directory (`store="bluestore"`, the default: data-heavy rows then write to a
disk, as a real object store does, with a fixed 128 MiB cache) or in its
memory (`store="memstore"`: about twice what is stored, which a full run's
gigabytes make too much for a shared machine). `capacity` bounds either.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pytest
import yaml

from _common import BenchError, launch, need_tool, sh
from tests.support.ceph import CephS3, start_ceph_s3

REDIRECT, PROXIED = "redirect on", "redirect off"
VARIANTS = (REDIRECT, PROXIED)
STORES = ("bluestore", "memstore")


def bucket_name(label: str, variant: str) -> str:
    """An S3 bucket name (3-63 of a-z0-9-) for one registry's variant."""
    return re.sub(r"[^a-z0-9]+", "-", f"bench {label} {variant}".lower()).strip("-")[:63]


class S3Targets:
    """The Ceph cluster and, per registry label, its two S3 processes."""

    def __init__(self, work: Path, labels: Sequence[str], *, store: str = "bluestore", capacity: int):
        if store not in STORES:
            raise ValueError(f"store must be one of {STORES}")
        self.work, self.labels, self.store, self.capacity = work, tuple(labels), store, capacity
        self.ceph: CephS3 | None = None
        self.servers: list[launch.RegistryServer] = []
        self.by_variant: dict[str, dict[str, launch.RegistryServer]] = {v: {} for v in VARIANTS}
        self._checked = False

    def start(self) -> None:
        buckets = [bucket_name(label, v) for label in self.labels for v in VARIANTS]
        try:
            self.ceph = start_ceph_s3(self.work / "ceph", buckets=buckets, store=self.store,
                                      capacity=self.capacity)
        except (pytest.skip.Exception, pytest.fail.Exception) as exc:   # Ceph's packages are missing
            raise BenchError(str(exc)) from None
        except RuntimeError as exc:
            raise BenchError(f"Ceph did not start: {str(exc)[:3000]}") from None
        for label in self.labels:
            for variant in VARIANTS:
                server = (self._distribution(label, variant) if label == "Distribution"
                          else self._dockyard(label, variant))
                self.servers.append(server)
                self.by_variant[variant][label] = server

    def _stem(self, label: str, variant: str) -> str:
        return "s3-" + bucket_name(label, variant).removeprefix("bench-")

    def _distribution(self, label: str, variant: str) -> launch.RegistryServer:
        workdir = self.work / self._stem(label, variant)
        workdir.mkdir(parents=True, exist_ok=True)
        settings = launch.distribution_config(workdir / "unused", launch.free_port())
        storage = settings["storage"]
        del storage["filesystem"]       # Distribution refuses two drivers
        storage["s3"] = {
            "regionendpoint": self.ceph.endpoint, "bucket": bucket_name(label, variant),
            "accesskey": self.ceph.access_key, "secretkey": self.ceph.secret_key,
            "region": self.ceph.region, "secure": False, "v4auth": True,
        }
        storage["redirect"] = {"disable": variant == PROXIED}
        path = workdir / "config.yml"
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        return launch.launch_distribution(workdir, config=path, env={"AWS_CA_BUNDLE": ""})

    def _dockyard(self, label: str, variant: str) -> launch.RegistryServer:
        stem = self._stem(label, variant)
        settings = {"storage": {
            "driver": "s3", "root": str(self.work / stem), "redirect": variant == REDIRECT,
            "s3": {"bucket": bucket_name(label, variant), "endpoint_url": self.ceph.endpoint,
                   "region": self.ceph.region, "access_key_id": self.ceph.access_key,
                   "secret_access_key": self.ceph.secret_key},
        }}
        return launch.launch_dockyard(config=settings, workers=int(label.split("=")[1]),
                                      log_path=self.work / f"{stem}.log")

    def variants(self) -> list[tuple[str, Mapping[str, launch.RegistryServer]]]:
        return list(self.by_variant.items())

    def stored_bytes(self, bucket: str) -> int:
        """Bytes of the objects in `bucket` now (a listing; untimed)."""
        pages = self.ceph.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sum(o["Size"] for page in pages for o in page.get("Contents", []))

    def check(self, blob_url: Callable[[launch.RegistryServer], tuple[str, int]]) -> None:
        """Once, after the first push: every process serves the blob at
        blob_url(server) (URL, size) as its variant says (307 to a presigned
        URL with redirect on, the bytes with it off) and its bucket holds at
        least its size, so no registry runs on anything but its bucket."""
        if self._checked:
            return
        for variant, servers in self.by_variant.items():
            for label, server in servers.items():
                url, size = blob_url(server)
                status = sh([need_tool("curl"), "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                             url], timeout=120).split()
                want = "307" if variant == REDIRECT else "200"
                if status[0] != want or (want == "307" and not status[1].startswith(self.ceph.endpoint)):
                    raise BenchError(f"{label}, S3 {variant}: blob GET answered {' '.join(status)}, "
                                     f"not {want}{' to ' + self.ceph.endpoint if want == '307' else ''}")
                stored = self.stored_bytes(bucket_name(label, variant))
                if stored < size:
                    raise BenchError(f"{label}, S3 {variant}: its bucket holds {stored} bytes, less than "
                                     f"the {size} of one layer pushed")
        self._checked = True

    def describe(self) -> list[str]:
        gib = f"{self.capacity / (1 << 30):.1f} GiB"
        store = (f"BlueStore on a sparse file of {gib} under the work directory" if self.store == "bluestore"
                 else f"memstore (objects in the OSD's memory, at most {gib})")
        rss = self.ceph.rss() if self.ceph else {}
        return [
            f"S3 rows: one Ceph {ceph_version()} cluster on loopback (one OSD, {store}; radosgw beast, "
            f"32 threads); each registry x redirect setting is a process with a bucket of its own.",
            "S3 rows: Distribution's own S3 driver (regionendpoint, v4auth, chunksize 10 MiB default, "
            "redirect.disable); Dockyard storage.driver s3 (part_size 16 MiB default, storage.redirect). "
            "Redirect on: blob GET answers 307 to a presigned URL and skopeo fetches from radosgw.",
            "Ceph memory at the end: " + ", ".join(f"{n} {v >> 20} MiB" for n, v in rss.items() if v),
        ]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        if self.ceph is not None:
            self.ceph.stop()


def ceph_version() -> str:
    """"16.2.11" or so ("ceph version 16.2.11 (...) pacific (stable)")."""
    try:
        words = sh(["ceph", "--version"], timeout=30).split()
    except (BenchError, OSError):
        return "?"
    return words[2] if len(words) > 2 else "?"


class S3Steps:
    """bench_registry.Bench's S3 steps: its push, pull and manifest GET
    steps, run on the S3 processes of each variant in turn (rows named
    "S3, redirect on: ...", "S3, redirect off: ...")."""

    s3: S3Targets | None

    def _s3_variants(self) -> list[tuple[Mapping[str, launch.RegistryServer], str]]:
        if self.s3 is None:
            raise BenchError("the S3 steps need the S3 targets (main starts them)")
        return [(servers, f"S3, {variant}: ") for variant, servers in self.s3.variants()]

    def s3_push_big(self) -> None:
        for servers, title in self._s3_variants():
            self.push_big(servers, title, self.plan.s3_repeats)

    def s3_push_small(self) -> None:
        for servers, title in self._s3_variants():
            self.push_small(servers, title, self.plan.s3_repeats)

    def _s3_check(self) -> None:
        self.s3.check(self._blob)

    def s3_pull_big(self) -> None:
        self._s3_check()
        for servers, title in self._s3_variants():
            self.pull_big(servers, title, self.plan.s3_repeats)

    def s3_pull_small(self) -> None:
        self._s3_check()
        for servers, title in self._s3_variants():
            self.pull_small(servers, title, self.plan.s3_repeats)

    def s3_manifest_get(self) -> None:
        """wrk on the redirect-on processes (a manifest GET never redirects),
        the registries' order rotating as in the plain wrk steps."""
        self._s3_check()
        servers = dict(self._s3_variants()[0][0])
        for label in self._rotated(servers, len(self.rows)):
            self.manifest_get(label, servers[label], "S3: ")
