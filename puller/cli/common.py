"""Plumbing every client subcommand shares (puller.cli.client for pull,
push, copy, login, logout, inspect; puller.cli.run for unpack and run):

    add_store_flag(parser)                 --store
    add_transport_flags(parser)            --plain-http, --insecure, --ca-file, --concurrency, --creds
    add_output_flags(parser)               -q/--quiet | --json
    client_options(args, registries)       -> puller.client.options.ClientOptions
    progress_for(args)                     bars, one summary line, or nothing (--quiet, --json)
    run_async(coro_factory)                the coroutine's result (uvloop when installed)
    run_command(coro_factory, args)        run_async, with a ClientError as one line and exit 1
    fail(exc, json_output=False)           print "dockyard: error: <first line>"; return 1
    print_error(message)                   the same line for a usage error found by hand
    emit(args, payload, line)              the result: JSON, a line, or nothing (one_line=True: JSON Lines)

Every failure a user can see is a puller.errors.ClientError, so this is the
one place that catches: one class, printed as one line.

Cheap to import: the dispatcher loads it for --help; the HTTP client and
the transfers are imported by the commands that use them.
"""

from __future__ import annotations

import argparse
import json
import sys

from puller.errors import ClientError, one_line

ERROR_PREFIX = "dockyard: error: "


def add_store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR", help="local store (default ~/.local/share/dockyard/store)")


def add_transport_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("transport")
    group.add_argument("--plain-http", action="store_true", help="talk plain HTTP (no TLS) to the registry")
    group.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    group.add_argument("--ca-file", metavar="FILE", help="trust the CA certificates in FILE")
    group.add_argument("--concurrency", type=int, default=6, metavar="N", help="parallel blob transfers (6)")
    group.add_argument("--creds", metavar="USER:PASS", help="credentials for this command (default: docker config)")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    group.add_argument("--json", action="store_true", help="print the result as one JSON object")


def client_options(args, registries: list[str] = ()):
    """ClientOptions from the transport flags; --creds applies to `registries`."""
    from puller.client.auth import Credentials
    from puller.client.options import ClientOptions
    creds = ()
    if getattr(args, "creds", None):
        user, _, password = args.creds.partition(":")
        creds = tuple((r, Credentials(user, password)) for r in registries)
    return ClientOptions(plain_http=args.plain_http, insecure=args.insecure, ca_file=args.ca_file,
                         concurrency=max(1, args.concurrency), credentials=creds)


def progress_mode(args) -> str:
    return "json" if getattr(args, "json", False) else "quiet" if getattr(args, "quiet", False) else "auto"


def progress_for(args):
    from puller.transfer.progress import make_progress
    return make_progress(progress_mode(args))


def run_async(coro_factory):
    """Run the coroutine coro_factory() to its end on a fresh event loop."""
    import asyncio
    import gc
    gc.freeze()             # what start-up made lives to the end: never scanned again
    gc.enable()             # (puller.cli.main kept collections off until here)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(coro_factory())


def print_error(message: str) -> None:
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr)


def fail(exc: BaseException, *, json_output: bool = False) -> int:
    message = one_line(exc)
    print_error(message)
    if json_output:
        print(json.dumps({"error": message}))
    return 1


def run_command(coro_factory, args=None) -> int:
    try:
        return run_async(coro_factory)
    except ClientError as exc:
        return fail(exc, json_output=getattr(args, "json", False))


def emit(args, payload: dict, line: str, *, one_line: bool = False) -> None:
    """`one_line`: JSON on one line (a command printing one result per round: JSON Lines)."""
    if args.json:
        print(json.dumps(payload, indent=None if one_line else 2))
    elif not args.quiet:
        print(line)
