"""`dockyard unpack` and `dockyard run`.

    dockyard unpack [--store DIR] [--cache DIR | --no-cache] [--json] REF DIR
    dockyard run [--rm] [--init] [-t] [-e K=V] [-v HOST|NAME:CONTAINER[:ro]] [--network none|host]
                 [--runtime runc|crun] [--name NAME] [-u USER] [-w DIR]
                 [--entrypoint CMD] REF [CMD...]

REF is a reference (pulled into the local store if it is not there) or
`oci:LAYOUTDIR[:TAG]`. Errors are one line on stderr and a non-zero exit;
`run` exits with the container's exit code (128+n when signal n ended it) and
forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGWINCH to its PID 1.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

from puller.cli.common import emit, fail, run_async
from puller.errors import ClientError
from puller.runtime.bundle import write_bundle
from puller.runtime.options import ApplyOptions, UnpackLimits
from puller.runtime.snapshots import SnapshotCache
from puller.runtime.spec import RunSettings, Volume

GiB = 1 << 30


def _common(parser: argparse.ArgumentParser) -> None:
    from puller.cli.common import add_store_flag as _add_store_flag, add_transport_flags as _add_transport_flags
    _add_store_flag(parser)
    _add_transport_flags(parser)
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform (default: host)")
    parser.add_argument("--cache", metavar="DIR",
                        help="unpacked-layer cache (default: next to the store, 'unpacked')")
    parser.add_argument("--max-layer-size", type=float, default=64, metavar="GiB",
                        help="refuse a layer whose uncompressed tar exceeds this (64)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no pull progress")


def _setup(args):
    from puller.cli.common import client_options as _options
    from puller.transfer.progress import make_progress
    from puller.client.reference import parse_reference
    from puller.store import LocalStore, parse_layout_reference

    from puller.runtime import rootless

    store = LocalStore(args.store)
    mode = rootless.current()
    # with only the user's ID mapped, the image's other owners cannot be set
    as_root = False if mode is not None and not mode.subids else None
    options = ApplyOptions(limits=UnpackLimits(max_layer_bytes=int(args.max_layer_size * GiB)), as_root=as_root)
    cache = None
    if not getattr(args, "no_cache", False):
        cache = SnapshotCache(cache_dir_for(args, store))
    registries: list[str] = []
    if parse_layout_reference(args.reference) is None:
        try:
            ref = parse_reference(args.reference)
            registries = [ref.registry, ref.api_host]
        except Exception:
            pass
    client_options = _options(args, registries)
    quiet = args.quiet or getattr(args, "json", False) or not sys.stderr.isatty()
    progress = make_progress("quiet" if quiet else "auto")
    return store, cache, options, client_options, progress


def cache_dir_for(args, store) -> Path:
    """--cache, else the default next to the store (its own in a user namespace with an ID range)."""
    from puller.runtime import rootless
    from puller.runtime.image import default_cache_dir
    if args.cache:
        return Path(args.cache)
    cache_dir = default_cache_dir(store.root)
    mode = rootless.current()
    if mode is not None and mode.subids:
        # owners from the user's ID range: not to be mixed with the snapshots unpacked without it
        cache_dir = cache_dir.with_name(cache_dir.name + "-userns")
    return cache_dir


def _prepare(args, store, cache, options, client_options, progress):
    from puller.runtime.image import prepare_image

    async def main():
        with progress:
            return await prepare_image(args.reference, store=store, cache=cache, platform=args.platform,
                                       client_options=client_options, progress=progress, options=options)
    return run_async(main)


def cmd_unpack(args) -> int:
    try:
        store, cache, options, client_options, progress = _setup(args)
        layers, config = _prepare(args, store, cache, options, client_options, progress)
        bundle = write_bundle(args.directory, layers, config, cache=cache, options=options)
    except ClientError as exc:  # the runtime's errors and its OSErrors included
        return fail(exc, json_output=args.json)
    emit(args, {"reference": args.reference, "bundle": str(bundle), "rootfs": str(bundle / "rootfs"),
                "config": str(bundle / "config.json"), "layers": [str(blob) for blob, _, _ in layers],
                "diff_ids": [diff_id for _, _, diff_id in layers]},
         f"{args.reference}: unpacked {len(layers)} layers into {bundle}")
    return 0


def volumes_dir(store) -> Path:
    """Named volumes live beside the store and the unpack cache (the user's data directory)."""
    return store.root.parent / "volumes"


def cmd_run(args) -> int:
    import os

    from puller.runtime import rootless
    from puller.runtime.run import find_init, find_runtime, run_container
    from puller.store import LocalStore
    try:
        if os.geteuid() != 0 and rootless.current() is None:
            rootless.enter_user_namespace()  # runs this command again in a user namespace of ours
        runtime = find_runtime(args.runtime)
        settings = RunSettings(
            command=tuple(args.command) if args.command else None,
            entrypoint=tuple(args.entrypoint.split()) if args.entrypoint is not None else None,
            env=tuple(args.env or ()), user=args.user, workdir=args.workdir,
            volumes=tuple(Volume.parse(v, volumes_dir(LocalStore(args.store))) for v in args.volume or ()),
            network=args.network, hostname=args.hostname, tty=args.tty,
            readonly_rootfs=args.read_only, init=find_init() if args.init else None)
        args.no_cache = False
        store, cache, options, client_options, progress = _setup(args)
        layers, config = _prepare(args, store, cache, options, client_options, progress)
        container_id = args.name or uuid.uuid4().hex
        code = run_container(layers, config, settings, cache=cache, runtime=runtime, name=container_id,
                             remove=args.rm, options=options, detach=args.detach, image=args.reference)
        if args.detach and not args.quiet:
            print(container_id)
        return code
    except ClientError as exc:  # the runtime's errors and its OSErrors included
        return fail(exc)


def register(subparsers) -> None:
    p = subparsers.add_parser("unpack", help="unpack an image into an OCI runtime bundle (rootfs + config.json)")
    p.add_argument("reference", help="NAME[:TAG|@DIGEST] or oci:LAYOUTDIR[:TAG]")
    p.add_argument("directory", help="bundle directory to create (must not exist or be empty)")
    p.add_argument("--no-cache", action="store_true", help="apply layers straight into the bundle")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_unpack)

    p = subparsers.add_parser("run", help="run an image with runc or crun")
    p.add_argument("reference", help="NAME[:TAG|@DIGEST] or oci:LAYOUTDIR[:TAG]")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments (default: the image's)")
    p.add_argument("--rm", action="store_true", help="remove the container's bundle when it exits")
    p.add_argument("-d", "--detach", action="store_true",
                   help="run in the background and print its ID (see dockyard ps, logs, stop, rm)")
    p.add_argument("-e", "--env", action="append", metavar="K=V", help="set an environment variable")
    p.add_argument("-v", "--volume", action="append", metavar="HOST:CONTAINER[:ro]",
                   help="bind mount an existing file or directory, or NAME:CONTAINER for a named volume")
    p.add_argument("--init", action="store_true", help="run a tiny init (tini) as PID 1 that forwards signals")
    p.add_argument("--network", choices=("none", "host", "slirp4netns"), default="none",
                   help="none: own network namespace with loopback (default); host: the host's; "
                        "slirp4netns: outbound access without root (the host's loopback refused)")
    p.add_argument("--runtime", choices=("runc", "crun"), help="OCI runtime (default: runc, else crun)")
    p.add_argument("--name", help="container name (default: random)")
    p.add_argument("-u", "--user", help="USER[:GROUP] or UID[:GID]")
    p.add_argument("-w", "--workdir", help="working directory inside the container")
    p.add_argument("--entrypoint", help="override the image's entrypoint")
    p.add_argument("--hostname", help="container host name (default: the ID's first 12 characters)")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    _common(p)
    p.set_defaults(func=cmd_run)
