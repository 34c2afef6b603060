"""`dockyard mirror export|import|inventory|sync`: images carried into a
network with no route to their registries, as one bundle, or copied from
registry to registry (puller.transfer.mirror).

Every failure is one line on stderr and exit 1; `--json` prints the result
as one JSON object; progress bars with bytes and ETA on a terminal.
"""

from __future__ import annotations

import os
import sys

from puller.cli.common import add_output_flags, add_transport_flags, client_options, emit, progress_for, run_command


def _selection(values: list[str]):
    from puller.transfer.mirror.images_file import Selection, read_images_file, selection_from_refs
    selection = Selection()
    for value in values:
        part = read_images_file(value) if os.path.isfile(value) else selection_from_refs([value])
        selection.images += part.images
        selection.repositories += part.repositories
    return selection


def _registries(selection) -> list[str]:
    refs = list(selection.images) + [spec.repository for spec in selection.repositories]
    return sorted({host for ref in refs for host in (ref.registry, ref.api_host)})


def _pushing(args, registries: list[str]):
    """The client options of a command that pushes whole images: each blob goes in one
    streamed PATCH (as docker push sends it), not 16 MiB chunks. A broken upload starts
    its blob again anyway, so chunks bought nothing but a round trip each."""
    import dataclasses
    return dataclasses.replace(client_options(args, registries), upload_chunk_size=2 ** 62)


def cmd_export(args) -> int:
    import asyncio

    from puller.transfer.mirror.bundle import read_bundle_manifest
    from puller.transfer.mirror.export import export_bundle
    from puller.transfer.mirror.inventory import Have

    async def main() -> int:
        selection = await asyncio.to_thread(_selection, args.images)
        have = None
        if args.have:
            have = await asyncio.to_thread(Have.load, args.have)
        elif args.since:
            have = Have.from_bundle((await asyncio.to_thread(read_bundle_manifest, args.since))[0])
        with progress_for(args) as progress:
            result = await export_bundle(selection, args.output, options=client_options(args, _registries(selection)),
                                         platform=args.platform, referrers=args.referrers, compress=args.zstd,
                                         fmt=args.format, sign_key=args.sign_key, have=have,
                                         max_size=args.max_size, progress=progress)
        carried = sum(1 for i in result.images if i["state"] != "unchanged")
        emit(args, result.to_json(),
             f"{result.output}: {carried} image(s) ({len(result.images) - carried} unchanged), "
             f"{result.referrers} referrer(s), {result.manifests} manifest(s), {result.blobs} blob(s), "
             f"{result.prerequisites} prerequisite(s); {result.bundle_bytes} bytes"
             + (", signed" if result.signed else "") + (f", {len(result.volumes)} volumes" if result.volumes else ""))
        return 0
    return run_command(main, args)


def cmd_import(args) -> int:
    from puller.transfer.mirror.imports import import_bundle
    from puller.transfer.mirror.target import Target

    async def main() -> int:
        target = Target.parse(args.to)
        with progress_for(args) as progress:
            result = await import_bundle(args.bundle, args.to, options=_pushing(args, [target.registry]),
                                         verify_key=args.verify_key, progress=progress)
        emit(args, result.to_json(),
             f"{result.target}: {len(result.images)} image(s) ({result.referrers} referrers), "
             f"{len(result.tags)} tag(s); {result.blobs_uploaded} blob(s) uploaded ({result.bytes_uploaded} bytes), "
             f"{result.blobs_mounted} mounted, {result.blobs_existing} present ({result.bytes_skipped} bytes "
             f"skipped); signature {result.signature}")
        return 0
    return run_command(main, args)


def cmd_inventory(args) -> int:
    import asyncio

    from puller.client.http import RegistryClient
    from puller.transfer.mirror.inventory import take_inventory, write_atomic
    from puller.transfer.mirror.target import Target

    async def main() -> int:
        target = Target.parse(args.registry)
        async with RegistryClient(client_options(args, [target.registry])) as client:
            have = await take_inventory(client, target, args.max_entries)
        await asyncio.to_thread(write_atomic, args.output, have.to_json(target.registry, target.prefix))
        payload = {"output": args.output, "registry": target.registry, "prefix": target.prefix,
                   "repositories": len(have.tags), "manifests": len(have.manifests), "blobs": len(have.blobs),
                   "truncated": have.truncated}
        emit(args, payload, f"{args.output}: {len(have.tags)} repositories, {len(have.manifests)} manifests, "
                            f"{len(have.blobs)} blobs" + (" (truncated at --max-entries)" if have.truncated else ""))
        return 0
    return run_command(main, args)


def cmd_sync(args) -> int:
    import asyncio
    import signal

    from puller.cli.common import print_error
    from puller.transfer.mirror.sync import read_sync_config, sync_once

    async def one_round(config, hosts) -> bool:
        with progress_for(args) as progress:
            result = await sync_once(config, options=_pushing(args, hosts), progress=progress)
        summary = result.to_json()
        for failure in result.failed:
            print_error(f"{failure['source']}: {failure['error']}")
        emit(args, summary, f"{result.target}: {summary['copied']} copied, {summary['unchanged']} unchanged, "
                            f"{summary['failed']} failed; {result.bytes_transferred} bytes in "
                            f"{result.seconds:.1f}s", one_line=bool(args.interval))
        sys.stdout.flush()                  # one summary per round, as it ends (a pipe buffers)
        return not result.failed

    async def main() -> int:
        config = await asyncio.to_thread(read_sync_config, args.config)
        hosts = _registries(config.selection) + [config.target.registry]
        if not args.interval:
            return 0 if await one_round(config, hosts) else 1
        # on a schedule until SIGTERM or SIGINT (--json: one line per round); between rounds
        # that ends the loop (exit 0);
        # during one, the round is cancelled (nothing is tagged before its image is whole)
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        while True:
            round_ = asyncio.ensure_future(one_round(config, hosts))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait([round_, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not round_.done():
                round_.cancel()
                await asyncio.gather(round_, return_exceptions=True)
                print_error("stopped during a sync round")
                return 143
            stopping.cancel()
            round_.result()
            try:
                await asyncio.wait_for(stop.wait(), args.interval)
                return 0
            except asyncio.TimeoutError:
                continue
    return run_command(main, args)


def _size(text: str) -> int:
    import argparse
    units = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
    number, unit = text.strip().upper().rstrip("IB") or "x", ""
    if number[-1:] in units and number[-1:]:
        number, unit = number[:-1], number[-1]
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4G, 700M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return value


def _seconds(text: str) -> float:
    import argparse
    import math
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def register(subparsers) -> None:
    mirror = subparsers.add_parser("mirror", help="carry images into an air-gapped network as bundles")
    # imports with collections off, ends without the interpreter's teardown (puller.cli.main)
    mirror.set_defaults(fast_exit=True)
    sub = mirror.add_subparsers(dest="mirror_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("export", help="write images from registries into one bundle")
    p.add_argument("--images", nargs="+", required=True, metavar="FILE|REF",
                   help="an images file (references, per-repository tag regexes and semver ranges) or references")
    p.add_argument("--output", "-o", required=True, metavar="BUNDLE")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="one platform of each index (default: all)")
    p.add_argument("--referrers", action="store_true", help="also carry signatures, SBOMs and attestations")
    p.add_argument("--zstd", action="store_true", help="compress the bundle with zstd")
    p.add_argument("--format", choices=["oci-archive", "docker-archive"], default="oci-archive",
                   help="docker-archive: also readable by `docker load` (one platform per image)")
    p.add_argument("--sign-key", metavar="PEM", help="sign the bundle manifest (ECDSA or Ed25519 private key)")
    delta = p.add_mutually_exclusive_group()
    delta.add_argument("--have", metavar="HAVE.json", help="carry only what this inventory lacks (a delta)")
    delta.add_argument("--since", nargs="+", metavar="BUNDLE",
                       help="carry only what this earlier bundle (or all its volumes) did not (a delta)")
    p.add_argument("--max-size", type=_size, metavar="N[K|M|G]",
                   help="split the bundle into volumes of at most N bytes (BUNDLE.vol001, ...)")
    add_transport_flags(p)
    add_output_flags(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="push a bundle's images into a registry")
    p.add_argument("bundle", nargs="+", help="the bundle, or all its volumes in any order")
    p.add_argument("--to", required=True, metavar="REGISTRY[/PREFIX]")
    p.add_argument("--verify-key", metavar="PEM", help="refuse the bundle unless this key signed it")
    add_transport_flags(p)
    add_output_flags(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("sync", help="copy images from registry to registry, once or on a schedule")
    p.add_argument("config", help="an images file with target: REGISTRY[/PREFIX] (and platform:, referrers:)")
    p.add_argument("--interval", type=_seconds, default=0, metavar="SECONDS",
                   help="sync again every SECONDS until SIGTERM or SIGINT (default: once)")
    add_transport_flags(p)
    add_output_flags(p)
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("inventory", help="list what a registry holds, for a delta export (--have)")
    p.add_argument("registry", metavar="REGISTRY[/PREFIX]")
    p.add_argument("--output", "-o", required=True, metavar="HAVE.json")
    p.add_argument("--max-entries", type=int, default=1_000_000, metavar="N",
                   help="stop after N digests (the inventory says it was truncated)")
    add_transport_flags(p)
    add_output_flags(p)
    p.set_defaults(func=cmd_inventory)
