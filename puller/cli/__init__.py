"""`dockyard`: the one command. A thin dispatcher: each room registers its
own subcommands and runs them; nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module has `register(subparsers)`, which adds its subcommands with
# `set_defaults(func=...)`; func(args) returns an exit code. The table names
# the commands each module registers, so a command imports only its own room
# (the HTTP client, the unpacker and the server are not loaded for one another).
COMMAND_MODULES = {
    "registry.cli": ("serve",),
    "puller.cli.client": ("pull", "push", "copy", "login", "logout", "inspect"),
    "puller.cli.run": ("unpack", "run"),
    "puller.cli.mirror": ("mirror",),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only the room that serves it is loaded."""
    parser = argparse.ArgumentParser(
        prog="dockyard",
        description="A self-hosted OCI registry and its daemonless client.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, commands in COMMAND_MODULES.items():
        if command is None or command in commands:
            importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    known = {c for commands in COMMAND_MODULES.values() for c in commands}
    parser = build_parser(argv[0] if argv and argv[0] in known else None)
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
