"""Client subcommands: pull, push, copy, login, logout, inspect.

Every failure is one line on stderr ("dockyard: error: ...") and exit 1;
`--json` prints one JSON object with the result on stdout. Flags, options,
progress and error printing are shared with unpack/run (puller.cli.common).
"""

from __future__ import annotations

import getpass
import json
import pathlib
import shutil
import sys
import tempfile

# Everything heavier (the HTTP client, the store, rich) is imported inside the
# commands: the dispatcher imports this module for --help too.
from puller.cli.common import (add_output_flags, add_store_flag, add_transport_flags, client_options, emit, fail,
                               print_error, progress_for, run_command)
from puller.errors import ClientError, ReferenceError, StoreError, one_line


# -- pull -------------------------------------------------------------------------

def cmd_pull(args) -> int:
    from puller.client.reference import parse_reference
    from puller.store import LocalStore
    from puller.transfer.pull import pull

    store = LocalStore(args.store)

    async def main() -> int:
        ref = parse_reference(args.reference)
        options = client_options(args, [ref.registry, ref.api_host])
        with progress_for(args) as progress:
            result = await pull(args.reference, store=store, platform=args.platform,
                                all_platforms=args.all_platforms, options=options, progress=progress)
        emit(args, result.to_json(), f"{result.reference}: pulled {result.manifest_digest} "
                                      f"({len(result.layers)} layers, {result.bytes_downloaded} bytes downloaded)")
        return 0
    return run_command(main, args)


# -- push -------------------------------------------------------------------------

def cmd_push(args) -> int:
    import asyncio

    from puller.client.http import RegistryClient
    from puller.client.reference import parse_reference
    from puller.store import LocalStore
    from puller.transfer.push import push_image
    from puller.transfer.sources import LayoutSource, open_layout_source, parse_source

    store = LocalStore(args.store)
    kind, location, name = parse_source(args.source)
    if args.destination is None:
        if kind != "store":
            print_error("a destination reference is needed to push oci: or docker-archive: sources")
            return 2
        dest_text = args.source
    else:
        dest_text = args.destination
    dest_text = dest_text[len("docker://"):] if dest_text.startswith("docker://") else dest_text

    async def main() -> int:
        dest = parse_reference(dest_text)
        options = client_options(args, [dest.registry, dest.api_host])
        try:
            workdir = pathlib.Path(tempfile.mkdtemp(prefix="dockyard-push-"))
        except OSError as exc:
            raise StoreError(one_line(exc)) from exc
        try:
            with progress_for(args) as progress:
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
        emit(args, result.to_json(), f"{result.reference}: pushed {result.digest} ({result.blobs_uploaded} "
                                      f"uploaded, {result.blobs_mounted} mounted, {result.blobs_existing} present)")
        return 0
    return run_command(main, args)


# -- copy -------------------------------------------------------------------------

def cmd_copy(args) -> int:
    from puller.client.reference import parse_reference
    from puller.transfer.copy import copy
    from puller.transfer.sources import parse_source

    async def main() -> int:
        registries = []
        for text in (args.source, args.destination):
            kind, location, _ = parse_source(text)
            if kind in ("store", "docker"):          # a registry reference
                ref = parse_reference(location)
                registries += [ref.registry, ref.api_host]
        with progress_for(args) as progress:
            result = await copy(args.source, args.destination, options=client_options(args, registries),
                                referrers=args.referrers, progress=progress)
        extra = f", {len(result.referrers)} referrers" if args.referrers else ""
        emit(args, result.to_json(), f"{result.destination}: copied {result.digest} "
                                      f"({len(result.manifests)} manifests{extra})")
        return 0
    return run_command(main, args)


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


def _usage_error(args, message: str) -> int:
    """A login/logout usage error: one line, exit 1 (and the JSON error with --json)."""
    print_error(message)
    if getattr(args, "json", False):
        print(json.dumps({"error": message}))
    return 1


def cmd_login(args) -> int:
    """As `docker login`: against a token registry the password is exchanged
    for an identity token when the server issues one, and that is saved
    (with the user name, without the password); else the password is."""
    import asyncio

    from puller.client.auth import Credentials, DockerConfig
    from puller.client.http import ClientOptions, RegistryClient

    registry = _registry_of(args.registry or "docker.io")
    api_host = "registry-1.docker.io" if registry == "docker.io" else registry
    username = args.username
    if args.password_stdin:
        if args.password is not None:
            return _usage_error(args, "--password and --password-stdin are mutually exclusive")
        if not username:
            return _usage_error(args, "--password-stdin needs --username")
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = args.password
        if password is not None and not args.quiet:
            print("warning: a password on the command line is visible to other users; use --password-stdin",
                  file=sys.stderr)
    if not username:
        if not sys.stdin.isatty():
            return _usage_error(args, "--username is required")
        username = input("Username: ").strip()
    if password is None:
        password = getpass.getpass("Password: ")
    if not username:
        return _usage_error(args, "a user name is required")
    if not password:
        # an empty password would fall back to an anonymous token and "succeed"
        return _usage_error(args, "a password is required")
    creds = Credentials(username, password)
    options = ClientOptions(plain_http=args.plain_http, insecure=args.insecure, ca_file=args.ca_file,
                            credentials=((registry, creds), (api_host, creds)))

    async def main() -> int:
        async with RegistryClient(options) as client:
            saved = await client.check_login(api_host)
        where = await asyncio.to_thread(DockerConfig().store, registry, saved)
        kind = "identity token" if saved.identity_token else "password"
        emit(args, {"registry": registry, "username": username, "saved": kind.replace(" ", "_"),
                    "location": where},
             f"Login Succeeded ({kind} saved in {where})")
        return 0
    return run_command(main, args)


def cmd_logout(args) -> int:
    from puller.client.auth import DockerConfig

    registry = _registry_of(args.registry or "docker.io")
    try:
        found = DockerConfig().erase(registry)
    except ClientError as exc:
        return fail(exc, json_output=args.json)
    emit(args, {"registry": registry, "removed": found},
         f"Removing login credentials for {registry}" if found else f"Not logged in to {registry}")
    return 0


# -- inspect ----------------------------------------------------------------------

def cmd_inspect(args) -> int:
    import asyncio

    from puller.client.http import RegistryClient
    from puller.client.reference import parse_reference
    from puller.store import LocalStore

    store = LocalStore(args.store)

    async def main() -> int:
        if not args.remote:
            digest, manifest, config = await asyncio.to_thread(store.image_for_platform, args.reference,
                                                               args.platform)
            print(json.dumps({"reference": args.reference, "digest": store.resolve(args.reference),
                              "manifest_digest": digest, "manifest": manifest, "config": config}, indent=2))
            return 0
        ref = parse_reference(args.reference)
        async with RegistryClient(client_options(args, [ref.registry, ref.api_host])) as client:
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
    return run_command(main, args)


def register(subparsers) -> None:
    p = subparsers.add_parser("pull", help="pull an image into the local store")
    p.add_argument("reference", help="NAME[:TAG|@DIGEST], e.g. 127.0.0.1:5000/busybox:latest")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform to pull from an index (default: host)")
    p.add_argument("--all-platforms", action="store_true", help="pull every platform of an index")
    add_store_flag(p)
    add_transport_flags(p)
    add_output_flags(p)
    p.set_defaults(func=cmd_pull)

    p = subparsers.add_parser("push", help="push an image to a registry")
    p.add_argument("source", help="a reference in the local store, oci:DIR[:TAG] or docker-archive:FILE")
    p.add_argument("destination", nargs="?", help="destination reference (default: the source reference)")
    add_store_flag(p)
    add_transport_flags(p)
    add_output_flags(p)
    p.set_defaults(func=cmd_push)

    p = subparsers.add_parser("copy", help="copy an image between registries and OCI layouts")
    p.add_argument("source", help="[docker://]REF, oci:DIR[:TAG] or docker-archive:FILE")
    p.add_argument("destination", help="[docker://]REF or oci:DIR[:TAG]")
    p.add_argument("--referrers", action="store_true", help="also copy artifacts attached via the referrers API")
    add_transport_flags(p)
    add_output_flags(p)
    p.set_defaults(func=cmd_copy)

    p = subparsers.add_parser("login", help="log in to a registry (saved in Docker's config.json)")
    p.add_argument("registry", nargs="?", help="registry host (default Docker Hub)")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--plain-http", action="store_true", help="talk plain HTTP (no TLS) to the registry")
    p.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    p.add_argument("--ca-file", metavar="FILE", help="trust the CA certificates in FILE")
    add_output_flags(p)
    p.set_defaults(func=cmd_login)

    p = subparsers.add_parser("logout", help="forget the credentials of a registry (config.json and helpers)")
    p.add_argument("registry", nargs="?", help="registry host (default Docker Hub)")
    add_output_flags(p)
    p.set_defaults(func=cmd_logout)

    p = subparsers.add_parser("inspect", help="show an image's manifest and config (local store or --remote)")
    p.add_argument("reference")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    p.add_argument("--remote", action="store_true", help="ask the registry instead of the local store")
    p.add_argument("--raw", action="store_true", help="with --remote: print the manifest bytes")
    add_store_flag(p)
    add_transport_flags(p)
    p.set_defaults(func=cmd_inspect)
