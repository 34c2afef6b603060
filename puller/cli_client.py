"""Client subcommands: pull, push, copy, login, logout, inspect.

Every failure is one line on stderr ("dockyard: error: ...") and exit 1;
`--json` prints one JSON object with the result on stdout.

Shared with the unpack/run commands (keep stable): `_add_store_flag(parser)`,
`_add_transport_flags(parser)` (--plain-http, --insecure, --ca-file,
--concurrency, --creds) and `_options(args, registries) -> ClientOptions`.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import pathlib
import shutil
import sys
import tempfile

# Heavy modules (the HTTP client, rich) are imported inside the commands: the
# dispatcher imports this module for every subcommand, `serve` included.
from puller.auth import CredentialError, Credentials, DockerConfig
from puller.reference import ReferenceError, parse_reference
from puller.store import LocalStore, StoreError


def _expected_errors() -> tuple:
    from puller.http import CLIENT_ERRORS
    return CLIENT_ERRORS + (ReferenceError, StoreError, OSError)


def _add_transport_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("transport")
    group.add_argument("--plain-http", action="store_true", help="talk plain HTTP (no TLS) to the registry")
    group.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    group.add_argument("--ca-file", metavar="FILE", help="trust the CA certificates in FILE")
    group.add_argument("--concurrency", type=int, default=6, metavar="N", help="parallel blob transfers (6)")
    group.add_argument("--creds", metavar="USER:PASS", help="credentials for this command (default: docker config)")


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    group.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _add_store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR", help="local store (default ~/.local/share/dockyard/store)")


def _options(args, registries: list[str] = ()):
    from puller.http import ClientOptions
    creds = ()
    if getattr(args, "creds", None):
        user, _, password = args.creds.partition(":")
        creds = tuple((r, Credentials(user, password)) for r in registries)
    return ClientOptions(plain_http=args.plain_http, insecure=args.insecure, ca_file=args.ca_file,
                         concurrency=max(1, args.concurrency), credentials=creds)


def _progress(args):
    from puller.progress import make_progress
    mode = "json" if getattr(args, "json", False) else "quiet" if getattr(args, "quiet", False) else "auto"
    return make_progress(mode)


def _run(coro_factory, args=None) -> int:
    try:
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        return runner(coro_factory())
    except _expected_errors() as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"dockyard: error: {message}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": message}))
        return 1


def _emit(args, payload: dict, line: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2))
    elif not args.quiet:
        print(line)


# -- pull -------------------------------------------------------------------------

def cmd_pull(args) -> int:
    from puller.pull import pull

    store = LocalStore(args.store)

    async def main() -> int:
        ref = parse_reference(args.reference)
        options = _options(args, [ref.registry, ref.api_host])
        with _progress(args) as progress:
            result = await pull(args.reference, store=store, platform=args.platform,
                                all_platforms=args.all_platforms, options=options, progress=progress)
        _emit(args, result.to_json(), f"{result.reference}: pulled {result.manifest_digest} "
                                      f"({len(result.layers)} layers, {result.bytes_downloaded} bytes downloaded)")
        return 0
    return _run(main, args)


# -- push -------------------------------------------------------------------------

def cmd_push(args) -> int:
    from puller.http import RegistryClient
    from puller.push import LayoutSource, open_layout_source, parse_source, push_image  # noqa: F401

    store = LocalStore(args.store)
    kind, location, name = parse_source(args.source)
    if args.destination is None:
        if kind != "store":
            print("dockyard: error: a destination reference is needed to push oci: or docker-archive: sources",
                  file=sys.stderr)
            return 2
        dest_text = args.source
    else:
        dest_text = args.destination
    dest_text = dest_text[len("docker://"):] if dest_text.startswith("docker://") else dest_text

    async def main() -> int:
        dest = parse_reference(dest_text)
        options = _options(args, [dest.registry, dest.api_host])
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="dockyard-push-"))
        try:
            with _progress(args) as progress:
                if kind == "store":
                    source = LayoutSource(store, location)
                    if store.descriptor(location) is None:
                        raise StoreError(f"{location} is not in the store {store.root} (pull it first)")
                elif kind in ("oci", "docker-archive"):
                    source = await asyncio.to_thread(open_layout_source, kind, location, name, workdir)
                else:
                    raise ReferenceError(f"cannot push from {args.source}: use dockyard copy")
                async with RegistryClient(options) as client:
                    result = await push_image(source, client, dest, progress=progress)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        _emit(args, result.to_json(), f"{result.reference}: pushed {result.digest} ({result.blobs_uploaded} "
                                      f"uploaded, {result.blobs_mounted} mounted, {result.blobs_existing} present)")
        return 0
    return _run(main, args)


# -- copy -------------------------------------------------------------------------

def cmd_copy(args) -> int:
    from puller.copy import copy

    async def main() -> int:
        registries = []
        for text in (args.source, args.destination):
            if not text.startswith(("oci:", "docker-archive:")):
                ref = parse_reference(text[9:] if text.startswith("docker://") else text)
                registries += [ref.registry, ref.api_host]
        with _progress(args) as progress:
            result = await copy(args.source, args.destination, options=_options(args, registries),
                                referrers=args.referrers, progress=progress)
        extra = f", {len(result.referrers)} referrers" if args.referrers else ""
        _emit(args, result.to_json(), f"{result.destination}: copied {result.digest} "
                                      f"({len(result.manifests)} manifests{extra})")
        return 0
    return _run(main, args)


# -- login / logout ---------------------------------------------------------------

def _registry_of(text: str) -> str:
    text = text.strip()
    for prefix in ("https://", "http://"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = text.split("/", 1)[0]
    if text in ("docker.io", "index.docker.io", "registry-1.docker.io", ""):
        return "docker.io"
    return text


def cmd_login(args) -> int:
    registry = _registry_of(args.registry or "docker.io")
    api_host = "registry-1.docker.io" if registry == "docker.io" else registry
    username = args.username
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = args.password
    if not username:
        if not sys.stdin.isatty():
            print("dockyard: error: --username is required", file=sys.stderr)
            return 1
        username = input("Username: ")
    if password is None:
        password = getpass.getpass("Password: ")
    creds = Credentials(username, password)
    from puller.http import ClientOptions, RegistryClient
    options = ClientOptions(plain_http=args.plain_http, insecure=args.insecure, ca_file=args.ca_file,
                            credentials=((registry, creds), (api_host, creds)))

    async def main() -> int:
        async with RegistryClient(options) as client:
            await client.check_login(api_host)
        where = await asyncio.to_thread(DockerConfig().store, registry, creds)
        if not args.quiet:
            print(f"Login Succeeded (credentials saved in {where})")
        return 0
    return _run(main, args)


def cmd_logout(args) -> int:
    registry = _registry_of(args.registry or "docker.io")
    try:
        found = DockerConfig().erase(registry)
    except (CredentialError, OSError) as exc:
        print(f"dockyard: error: {exc}", file=sys.stderr)
        return 1
    print(f"Removing login credentials for {registry}" if found else f"Not logged in to {registry}")
    return 0


# -- inspect ----------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from puller.http import RegistryClient
    store = LocalStore(args.store)

    async def main() -> int:
        if not args.remote:
            digest, manifest, config = await asyncio.to_thread(store.image_for_platform, args.reference,
                                                               args.platform)
            print(json.dumps({"reference": args.reference, "digest": store.resolve(args.reference),
                              "manifest_digest": digest, "manifest": manifest, "config": config}, indent=2))
            return 0
        ref = parse_reference(args.reference)
        async with RegistryClient(_options(args, [ref.registry, ref.api_host])) as client:
            top = await client.get_manifest(ref)
            payload = {"reference": str(ref), "digest": top.digest, "media_type": top.media_type,
                       "manifest": top.json}
            if not top.is_index and top.parsed.config is not None:
                payload["config"] = await client.get_config(ref, top.parsed.config)
            if args.raw:
                sys.stdout.write(top.data.decode())
                return 0
            print(json.dumps(payload, indent=2))
        return 0
    return _run(main, args)


def register(subparsers) -> None:
    p = subparsers.add_parser("pull", help="pull an image into the local store")
    p.add_argument("reference", help="NAME[:TAG|@DIGEST], e.g. 127.0.0.1:5000/busybox:latest")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform to pull from an index (default: host)")
    p.add_argument("--all-platforms", action="store_true", help="pull every platform of an index")
    _add_store_flag(p)
    _add_transport_flags(p)
    _add_output_flags(p)
    p.set_defaults(func=cmd_pull)

    p = subparsers.add_parser("push", help="push an image to a registry")
    p.add_argument("source", help="a reference in the local store, oci:DIR[:TAG] or docker-archive:FILE")
    p.add_argument("destination", nargs="?", help="destination reference (default: the source reference)")
    _add_store_flag(p)
    _add_transport_flags(p)
    _add_output_flags(p)
    p.set_defaults(func=cmd_push)

    p = subparsers.add_parser("copy", help="copy an image between registries and OCI layouts")
    p.add_argument("source", help="[docker://]REF, oci:DIR[:TAG] or docker-archive:FILE")
    p.add_argument("destination", help="[docker://]REF or oci:DIR[:TAG]")
    p.add_argument("--referrers", action="store_true", help="also copy artifacts attached via the referrers API")
    _add_transport_flags(p)
    _add_output_flags(p)
    p.set_defaults(func=cmd_copy)

    p = subparsers.add_parser("login", help="log in to a registry (saved in Docker's config.json)")
    p.add_argument("registry", nargs="?", help="registry host (default Docker Hub)")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--plain-http", action="store_true")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--ca-file", metavar="FILE")
    p.set_defaults(func=cmd_login)

    p = subparsers.add_parser("logout", help="forget the credentials of a registry")
    p.add_argument("registry", nargs="?")
    p.set_defaults(func=cmd_logout)

    p = subparsers.add_parser("inspect", help="show an image's manifest and config (local store or --remote)")
    p.add_argument("reference")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    p.add_argument("--remote", action="store_true", help="ask the registry instead of the local store")
    p.add_argument("--raw", action="store_true", help="with --remote: print the manifest bytes")
    _add_store_flag(p)
    _add_transport_flags(p)
    p.set_defaults(func=cmd_inspect)
