"""`dockyard ps`, `logs`, `stop`, `rm`: the containers `dockyard run` made
(puller.runtime.containers), found under the unpack cache.

    dockyard ps [-a] [--json]               running ones (-a: all, exited too)
    dockyard logs [-f] NAME                 a detached container's output (-f: until it ends)
    dockyard stop [-t SECONDS] NAME...      SIGTERM to PID 1, SIGKILL after -t (10)
    dockyard rm [-f] NAME...                remove stopped ones (-f: stop first)

NAME is the container's name or a unique prefix of its ID. As an ordinary
user they run in the user namespace `run` uses (its files are owned by the
user's ID range).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from puller.cli.common import add_store_flag, fail
from puller.errors import ClientError


def _containers_dir(args):
    from puller.cli.run import cache_dir_for
    from puller.runtime import rootless
    from puller.runtime.run import containers_dir
    from puller.runtime.snapshots import SnapshotCache
    from puller.store import LocalStore
    if os.geteuid() != 0 and rootless.current() is None:
        rootless.enter_user_namespace()
    return containers_dir(SnapshotCache(cache_dir_for(args, LocalStore(args.store))))


def _age(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} seconds ago"


def cmd_ps(args) -> int:
    from puller.runtime.containers import list_containers
    try:
        listed = [c for c in list_containers(_containers_dir(args)) if args.all or c.status == "running"]
    except ClientError as exc:
        return fail(exc, json_output=args.json)
    if args.json:
        print(json.dumps([c.to_json() for c in listed], indent=2))
        return 0
    rows = [("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS")]
    now = time.time()
    for c in listed:
        status = f"Exited ({c.exit_code})" if c.status == "exited" else c.status.capitalize()
        command = " ".join(c.command)
        rows.append((c.id[:12] if len(c.id) == 32 else c.id, c.image, command[:40], _age(now - c.created), status))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("   ".join(v.ljust(widths[i]) for i, v in enumerate(r[:4])) + "   " + r[4])
    return 0


def cmd_logs(args) -> int:
    from puller.runtime.containers import LOG, find
    try:
        container = find(_containers_dir(args), args.name)
        log = container.bundle / LOG
        if not log.exists():
            raise ClientError(f"container {container.id} has no logs (only a detached container's output is kept)")
        with open(log, "rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer)
            sys.stdout.flush()
            if args.follow:
                _follow(f, container)
    except OSError as exc:
        return fail(ClientError(f"cannot read the logs: {exc.strerror or exc}"))
    except ClientError as exc:
        return fail(exc)
    return 0


def _follow(f, container) -> None:
    """New output as it comes, until the container's shim is gone (then what it wrote last)."""
    from puller.runtime.containers import shim_alive
    while True:
        alive = shim_alive(container.bundle) is not None
        chunk = f.read(65536)
        if chunk:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            continue
        if not alive:
            return
        time.sleep(0.1)


def _each(args, action) -> int:
    from puller.runtime.containers import find
    code = 0
    try:
        where = _containers_dir(args)
    except ClientError as exc:
        return fail(exc)
    for name in args.names:
        try:
            container = find(where, name)
            action(container)
            print(name)
        except ClientError as exc:
            code = fail(exc)
    return code


def cmd_stop(args) -> int:
    from puller.runtime.containers import stop
    return _each(args, lambda c: stop(c, args.time))


def cmd_rm(args) -> int:
    from puller.runtime.containers import remove
    return _each(args, lambda c: remove(c, args.force))


def _location_flags(p) -> None:
    add_store_flag(p)
    p.add_argument("--cache", metavar="DIR", help="unpacked-layer cache (default: next to the store, 'unpacked')")


def register(subparsers) -> None:
    p = subparsers.add_parser("ps", help="list containers (running; -a: all)")
    p.add_argument("-a", "--all", action="store_true", help="exited containers too")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    _location_flags(p)
    p.set_defaults(func=cmd_ps)

    p = subparsers.add_parser("logs", help="print a detached container's output")
    p.add_argument("name", help="container name or ID prefix")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the container ends")
    _location_flags(p)
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser("stop", help="stop containers: SIGTERM, then SIGKILL after -t seconds")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-t", "--time", type=float, default=10.0, metavar="SECONDS", help="grace period (10)")
    _location_flags(p)
    p.set_defaults(func=cmd_stop)

    p = subparsers.add_parser("rm", help="remove stopped containers (-f: running ones too)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-f", "--force", action="store_true", help="stop a running container first (SIGKILL)")
    _location_flags(p)
    p.set_defaults(func=cmd_rm)
