"""`dockyard`: the one command. A thin dispatcher: each room registers its
own subcommands and runs them; nothing else lives here."""

from __future__ import annotations

import argparse
import gc
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
    "puller.cli.containers": ("ps", "logs", "stop", "rm"),
    "puller.cli.images": ("images", "rmi", "prune", "df"),
    "puller.cli.verbs": ("ls", "catalog", "manifest", "config", "blob", "tag", "delete", "digest"),
    "registry.gc_cli": ("gc",),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only the room that serves it is loaded."""
    parser = argparse.ArgumentParser(
        prog="dockyard",
        description="A self-hosted OCI registry and its daemonless client.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, commands in COMMAND_MODULES.items():
        if command is None or command in commands:
            importlib.import_module(name).register(sub)
    return parser


class _VersionAction(argparse.Action):
    """--version, the version looked up only when asked: importlib.metadata
    costs ~35 ms of imports, a seventh of a whole `dockyard run --rm`."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"dockyard {_version()}")
        parser.exit()


def _version() -> str:
    """The installed distribution's version (pyproject.toml), else the source tree's."""
    from importlib import metadata
    try:
        return metadata.version("dockyard")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    as_process = argv is None              # the console script or `python -m puller`
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:   # without loading every room for the parser
        print(f"dockyard {_version()}")
        return 0
    if argv and argv[0] in ROOTLESS_COMMANDS:
        _rootless_early()
    known = {c for commands in COMMAND_MODULES.values() for c in commands}
    parser = build_parser(argv[0] if argv and argv[0] in known else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    fast = as_process and getattr(args, "fast_exit", False)
    if fast:
        # its imports make thousands of objects and no garbage: no collections until
        # its work starts (puller.cli.common.run_async turns them back on)
        gc.disable()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()          # a pipe's buffer goes out here, where a broken pipe is caught
    except KeyboardInterrupt:
        print("dockyard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`| head`): one line, not a traceback
        # (as `dockyard blob` says it), and no second one when Python flushes at exit
        _stdout_to_devnull()
        print("dockyard: error: cannot write stdout: Broken pipe", file=sys.stderr)
        return 1
    if fast:
        _exit_now(code)
    return code


# run as an ordinary user, these re-run themselves in a user namespace (puller.runtime.rootless):
# done first, before the imports of the command, which the second process makes anyway
ROOTLESS_COMMANDS = ("run", "ps", "logs", "stop", "rm", "prune", "df")


def _rootless_early() -> None:
    import os
    if os.geteuid() == 0:
        return
    from puller.runtime import rootless
    if rootless.current() is None:
        from puller.errors import ClientError
        try:
            rootless.enter_user_namespace()
        except ClientError as exc:
            from puller.cli.common import fail
            sys.exit(fail(exc))


def _stdout_to_devnull() -> None:
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown (clearing every module
    of asyncio, ssl, ...: 20-50 ms, more than a no-change sync's requests). Only
    for a command that set `fast_exit`: its files are closed and its threads
    joined when it returns; what is left is output, flushed here."""
    import os
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1               # the output did not get out (a closed pipe)
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
