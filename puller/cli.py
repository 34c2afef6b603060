"""`dockyard`: the one command. A thin dispatcher: each room registers its
own subcommands and runs them; nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it serves) - each module has `register(subparsers)` which adds
# its subcommands with `set_defaults(func=...)`; func(args) returns an exit code.
COMMAND_MODULES = (
    "registry.cli",        # serve, gc
    "puller.cli_client",   # pull, push, copy, login, logout, inspect
    "puller.cli_run",      # unpack, run
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dockyard",
        description="A self-hosted OCI registry and its daemonless client.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a room not written yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dockyard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
