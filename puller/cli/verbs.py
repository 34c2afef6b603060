"""Registry verbs for people who run a registry (as crane and regctl have
them): reads and small edits straight against the distribution API, nothing
through the local store.

    dockyard ls REPO                    tags (distribution spec "Listing Tags", paged by Link)
    dockyard catalog REGISTRY           repositories ("Listing Repositories")
    dockyard manifest REF [--raw]       the manifest (--raw: its exact bytes)
    dockyard config REF [--platform P]  the image config (of the host's platform in an index)
    dockyard blob REF@DIGEST [-o FILE]  a blob's bytes, verified against the digest
    dockyard tag SRC NEWTAG             the same manifest under another tag (server side: one GET, one PUT)
    dockyard delete REF                 the manifest (a tag is resolved to its digest first)
    dockyard digest REF                 the manifest's digest (HEAD)

Each prints data on stdout, `--json` where it prints data; failures are
one line on stderr and exit 1 (puller.cli.common).
"""

from __future__ import annotations

import json
import os
import sys

from puller.cli.common import add_transport_flags, client_options, emit, run_command
from puller.errors import DigestMismatchError, ReferenceError, StoreError


def _ref(text: str, *, default_tag: bool = True):
    from puller.client.reference import parse_reference
    return parse_reference(text[len("docker://"):] if text.startswith("docker://") else text,
                           default_tag=default_tag)


def _client(args, ref_or_host):
    from puller.client.http import RegistryClient
    hosts = [ref_or_host] if isinstance(ref_or_host, str) else [ref_or_host.registry, ref_or_host.api_host]
    return RegistryClient(client_options(args, hosts))


def _print_json(document) -> None:
    print(json.dumps(document, indent=2))


# -- ls / catalog ---------------------------------------------------------------------

def cmd_ls(args) -> int:
    from puller.transfer.mirror.listing import list_tags

    async def main() -> int:
        ref = _ref(args.repository, default_tag=False)
        if ref.tag or ref.digest:
            raise ReferenceError(f"{args.repository}: give a repository, without a tag or digest")
        async with _client(args, ref) as client:
            tags = await list_tags(client, ref)
        _lines(args, {"repository": ref.name, "tags": tags}, tags)
        return 0
    return run_command(main, args)


def cmd_catalog(args) -> int:
    from puller.cli.client import _registry_of
    from puller.transfer.mirror.listing import list_repositories

    async def main() -> int:
        host = _registry_of(args.registry)
        async with _client(args, host) as client:
            repositories = await list_repositories(client, host)
        _lines(args, {"registry": host, "repositories": repositories}, repositories)
        return 0
    return run_command(main, args)


def _lines(args, payload: dict, items: list[str]) -> None:
    if args.json:
        _print_json(payload)
    else:
        for item in items:
            print(item)


# -- manifest / config / digest -------------------------------------------------------

def cmd_manifest(args) -> int:
    async def main() -> int:
        ref = _ref(args.reference)
        async with _client(args, ref) as client:
            top = await client.get_manifest(ref)
        if args.raw:
            sys.stdout.buffer.write(top.data)
            sys.stdout.flush()
        elif args.json:
            _print_json({"reference": str(ref), "digest": top.digest, "media_type": top.media_type,
                         "size": len(top.data), "manifest": top.json})
        else:
            _print_json(top.json)
        return 0
    return run_command(main, args)


def cmd_config(args) -> int:
    from puller.client.reference import choose_platform, host_platform, parse_platform
    from puller.errors import NotFoundError

    async def main() -> int:
        ref = _ref(args.reference)
        wanted = parse_platform(args.platform) if args.platform else host_platform()
        async with _client(args, ref) as client:
            top = await client.get_manifest(ref)
            image = top
            if top.is_index:
                chosen = choose_platform(top.json.get("manifests") or [], wanted)
                if chosen is None:
                    raise NotFoundError(f"{ref}: no image for {wanted} in the index")
                image = await client.get_manifest(ref, chosen["digest"])
                if image.is_index:
                    raise ReferenceError(f"{ref}: the index entry for the platform is itself an index")
            if image.parsed.config is None:
                raise ReferenceError(f"{ref}: the manifest has no config")
            config = await client.get_config(ref, image.parsed.config)
        if args.json:
            _print_json({"reference": str(ref), "manifest_digest": image.digest,
                         "digest": image.parsed.config.digest, "config": config})
        else:
            _print_json(config)
        return 0
    return run_command(main, args)


async def _resolve_digest(client, ref) -> str:
    from puller.errors import NotFoundError
    from puller.transfer.mirror.listing import manifest_digest
    if ref.digest:
        found = await manifest_digest(client, ref, ref.digest)
        if found is None:
            raise NotFoundError(f"manifest {ref}: not found")
        return ref.digest
    digest = await manifest_digest(client, ref, ref.identifier)
    if digest is None:
        raise NotFoundError(f"manifest {ref}: not found")
    if digest == ref.identifier:        # no Docker-Content-Digest on the HEAD: hash the body
        digest = (await client.get_manifest(ref)).digest
    return digest


def cmd_digest(args) -> int:
    async def main() -> int:
        ref = _ref(args.reference)
        async with _client(args, ref) as client:
            digest = await _resolve_digest(client, ref)
        emit(args, {"reference": str(ref), "digest": digest}, digest)
        return 0
    return run_command(main, args)


# -- blob -----------------------------------------------------------------------------

def cmd_blob(args) -> int:
    from storage.oci import digests
    from storage.oci.errors import OciError

    async def main() -> int:
        ref = _ref(args.reference, default_tag=False)
        if not ref.digest:
            raise ReferenceError(f"{args.reference}: name the blob as REPO@DIGEST")
        try:
            hasher = digests.hasher_for(ref.digest)
        except OciError as exc:
            raise ReferenceError(f"{args.reference}: {exc}") from None
        if args.output:
            out, tmp = _open_output(args.output)
        else:
            out, tmp = sys.stdout.buffer, None
        try:
            async with _client(args, ref) as client:
                async with client.blob(ref, ref.digest) as response:
                    async for piece in response.iter_body():
                        hasher.update(piece)
                        out.write(piece)
            actual = f"{ref.digest.split(':', 1)[0]}:{hasher.hexdigest()}"
            if actual != ref.digest:
                raise DigestMismatchError(f"blob {ref.digest} in {ref.name}: content hashes to {actual}")
            out.flush()
            if tmp:
                os.fsync(out.fileno())
                out.close()
                os.rename(tmp, args.output)   # only a verified blob gets the name
                tmp = None
        except OSError as exc:
            raise StoreError(f"cannot write {args.output or 'stdout'}: {exc.strerror or exc}") from exc
        finally:
            if tmp:
                out.close()
                os.unlink(tmp)
        return 0
    return run_command(main, args)


def _open_output(path: str):
    import tempfile
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dockyard-blob-", dir=directory)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return os.fdopen(fd, "wb"), tmp


# -- tag / delete ---------------------------------------------------------------------

def cmd_tag(args) -> int:
    from storage.oci.errors import OciError
    from storage.oci.names import validate_tag

    def is_tag(text: str) -> bool:
        try:
            validate_tag(text)
            return True
        except OciError:
            return False

    async def main() -> int:
        src = _ref(args.source)
        new_tag = args.tag
        if not is_tag(new_tag):
            target = _ref(new_tag, default_tag=False)
            if target.name != src.name or not target.tag or target.digest:
                raise ReferenceError(f"{new_tag}: give a tag, or REPO:TAG in the same repository "
                                     "(dockyard copy moves images between repositories)")
            new_tag = target.tag
        async with _client(args, src) as client:
            top = await client.get_manifest(src)
            # the same bytes under the new tag: the digest stays, no blob moves
            await client.put_manifest(src, new_tag, top.data, top.media_type)
        dest = src.with_tag(new_tag)
        emit(args, {"source": str(src), "reference": str(dest), "digest": top.digest},
             f"{dest}: tagged {top.digest}")
        return 0
    return run_command(main, args)


def cmd_delete(args) -> int:
    from puller.client.auth import Scope

    async def main() -> int:
        ref = _ref(args.reference)
        async with _client(args, ref) as client:
            digest = await _resolve_digest(client, ref)
            scopes = [Scope.repository(ref.repository, "pull", "delete")]
            async with client.request("DELETE", ref.api_host, f"/v2/{ref.repository}/manifests/{digest}",
                                      scopes=scopes) as response:
                if response.status not in (200, 202, 204):
                    raise await client.error_for(response, f"delete {ref.name}@{digest}")
        emit(args, {"reference": str(ref), "deleted": f"{ref.name}@{digest}"}, f"deleted {ref.name}@{digest}")
        return 0
    return run_command(main, args)


# -- registration ---------------------------------------------------------------------

def _json_flag(p) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def register(subparsers) -> None:
    def verb(name: str, help_text: str, func, *, json_flag: bool = True):
        p = subparsers.add_parser(name, help=help_text)
        add_transport_flags(p)
        if json_flag:
            _json_flag(p)
        p.set_defaults(func=func, quiet=False)
        return p

    p = verb("ls", "list a repository's tags", cmd_ls)
    p.add_argument("repository", help="REGISTRY/REPOSITORY")
    p = verb("catalog", "list a registry's repositories", cmd_catalog)
    p.add_argument("registry", help="registry host, e.g. 127.0.0.1:5000")
    p = verb("manifest", "print an image's manifest", cmd_manifest)
    p.add_argument("reference", help="NAME[:TAG|@DIGEST]")
    p.add_argument("--raw", action="store_true", help="the manifest's exact bytes (what its digest is of)")
    p = verb("config", "print an image's config", cmd_config)
    p.add_argument("reference", help="NAME[:TAG|@DIGEST]")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform in an index (default: host)")
    p = verb("blob", "write a blob's bytes (verified) to stdout or a file", cmd_blob, json_flag=False)
    p.add_argument("reference", help="NAME@DIGEST")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (made only once the digest matches)")
    p.set_defaults(json=False)
    p = verb("tag", "tag an image again in its repository (server side, no blob transfer)", cmd_tag)
    p.add_argument("source", help="NAME[:TAG|@DIGEST]")
    p.add_argument("tag", help="the new tag (or NAME:TAG in the same repository)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p = verb("delete", "delete a manifest (a tag names the manifest it points to)", cmd_delete)
    p.add_argument("reference", help="NAME[:TAG|@DIGEST]")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p = verb("digest", "print the digest of an image's manifest", cmd_digest)
    p.add_argument("reference", help="NAME[:TAG|@DIGEST]")

