"""`dockyard serve`: run the registry, in one process or N worker processes.

With --workers N the parent reserves the port, forks N workers that each
bind it with SO_REUSEPORT (the kernel spreads connections over them) and run
their own event loop (uvloop when installed), and then only supervises:
a worker that dies is restarted, SIGTERM/SIGINT stop them all. Workers share
nothing but storage, which holds every upload session, so a chunked upload
may hop between them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from registry.settings import Settings, SettingsError, load_settings

log = logging.getLogger("dockyard.serve")

_READY_TIMEOUT = 30.0      # seconds a worker has to start listening
_DRAIN_TIMEOUT = 10.0      # seconds in-flight requests get to finish on SIGTERM
_IO_THREADS = 32            # storage threads per worker process
_STOP_GRACE = 15.0         # seconds the supervisor waits for workers after SIGTERM
_RESTART_WINDOW = 10.0     # a worker dying sooner than this after start ...
_MAX_QUICK_DEATHS = 5      # ... this many times in a row stops the server


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="run the registry (OCI Distribution API)",
        description="Run the Dockyard registry. Settings come from defaults, then "
                    "--config FILE, then DOCKYARD_* environment variables, then these flags.")
    p.add_argument("--config", metavar="FILE", help="YAML settings file (see deploy/config.example.yml)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 5000; 0 picks a free one)")
    p.add_argument("--storage", metavar="DIR", help="filesystem storage root")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes sharing the port (default 1)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error", "critical"))
    p.add_argument("--access-log", action="store_true", default=None, help="log every request")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve HTTPS (with --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--auth", choices=("none", "htpasswd", "token"),
                   help="none (default), htpasswd (Basic, bcrypt) or token (Bearer, built-in token service)")
    p.add_argument("--htpasswd", metavar="FILE", help="users: bcrypt entries as `htpasswd -B` writes them")
    p.add_argument("--policy", metavar="FILE", help="YAML access policy (default: users may do everything)")
    p.add_argument("--log-format", choices=("text", "json"), help="log lines as text (default) or JSON")
    p.add_argument("--check-config", action="store_true",
                   help="check the settings, TLS files and storage, then exit (0: fine) without serving")
    p.add_argument("--lenient", action="store_true",
                   help="unknown settings keys and DOCKYARD_* variables are warnings, not errors")
    p.set_defaults(func=serve_command)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    http: dict[str, Any] = {}
    for key in ("host", "port", "workers"):
        if getattr(args, key, None) is not None:
            http[key] = getattr(args, key)
    if getattr(args, "access_log", None):
        http["access_log"] = True
    out: dict[str, Any] = {}
    if http:
        out["http"] = http
    if getattr(args, "storage", None):
        out["storage"] = {"driver": "filesystem", "root": os.path.abspath(args.storage)}
    log_section = {key: getattr(args, f"log_{key}") for key in ("level", "format")
                   if getattr(args, f"log_{key}", None)}
    if log_section:
        out["log"] = log_section
    tls = {key: os.path.abspath(getattr(args, f"tls_{key}")) for key in ("cert", "key")
           if getattr(args, f"tls_{key}", None)}
    if tls:
        out["tls"] = tls
    auth: dict[str, Any] = {}
    if getattr(args, "auth", None):
        auth["mode"] = args.auth
    for key in ("htpasswd", "policy"):
        if getattr(args, key, None):
            auth[key] = os.path.abspath(getattr(args, key))
    if auth:
        out["auth"] = auth
    return out


def exposure_warning(settings: Settings) -> str | None:
    """What a registry on a non-loopback address exposes without TLS or
    without auth, or None."""
    host = settings.http.host
    if _is_loopback(host):
        return None
    tls, auth = settings.tls.enabled, settings.auth.enabled
    if not tls and not auth:
        return (f"warning: serving plain HTTP without authentication on {host}: "
                "anyone who can reach the port may pull, push and delete; "
                "set tls.cert/tls.key (--tls-cert/--tls-key) and auth.mode (--auth)")
    if not auth:
        return (f"warning: serving without authentication on {host}: anyone who can reach the "
                "port may pull, push and delete; set auth.mode (--auth htpasswd|token)")
    if not tls:
        return (f"warning: serving plain HTTP on {host}: passwords and tokens cross the network "
                "unencrypted; set tls.cert/tls.key (--tls-cert/--tls-key)")
    return None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# How this server's settings were loaded: SIGHUP loads them again the same
# way for what may change at run time (lifecycle.read_only). Set before the
# workers fork, so each has it.
_settings_source: Callable[[], Settings] | None = None


def serve_command(args: argparse.Namespace) -> int:
    global _settings_source
    checking = bool(getattr(args, "check_config", False))
    try:
        _settings_source = functools.partial(
            load_settings, getattr(args, "config", None), overrides=_overrides(args),
            lenient=bool(getattr(args, "lenient", False)),
            warn=lambda text: print(f"dockyard serve: warning: {text}", file=sys.stderr, flush=True))
        settings = _settings_source()
        from registry.tls import server_context

        server_context(settings.tls)    # unreadable or mismatched files: one line, exit 2
        from registry.auth.runtime import prepare_signing_key

        if not checking:
            prepare_signing_key(settings)   # made once, before workers fork: one key signs for all
        if settings.storage.driver != "filesystem":
            asyncio.run(_check_storage(settings))   # once, not a traceback per worker
    except SettingsError as exc:
        print(f"dockyard serve: {exc}", file=sys.stderr)
        return 2
    from registry.ops.requestlog import configure_logging

    configure_logging(settings.log.level, settings.log.format)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)   # until a loop takes it (re-reads auth files)
    warning = exposure_warning(settings)
    if warning:
        print(f"dockyard serve: {warning}", file=sys.stderr, flush=True)
    if settings.storage.driver == "filesystem":
        try:
            os.makedirs(settings.storage.root, exist_ok=True)
        except OSError as exc:
            print(f"dockyard serve: cannot create storage root {settings.storage.root}: "
                  f"{exc.strerror}", file=sys.stderr)
            return 2
    failed = _probe_storage(settings)
    if failed:
        print(f"dockyard serve: {failed}", file=sys.stderr)
        return 2
    if checking:
        print("dockyard serve: configuration OK", flush=True)
        return 0
    from registry.ops.multiproc import prepare_multiprocess

    # before prometheus_client is imported and before the fork
    prepare_multiprocess(settings.http.workers, settings.metrics.enabled)
    try:
        if settings.http.workers == 1:
            return _run_worker(settings, reuse_port=False, announce=_announcer(settings))
        return _supervise(settings)
    except OSError as exc:
        print(f"dockyard serve: cannot listen on {settings.http.host}:{settings.http.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    except SettingsError as exc:
        print(f"dockyard serve: {exc}", file=sys.stderr)
        return 2


async def _check_storage(settings: Settings) -> None:
    """The driver's start-up check (S3: bucket, credentials, endpoint)."""
    from storage.config import StorageConfigError, check_driver, open_driver

    try:
        driver = open_driver(settings.storage)
    except StorageConfigError as exc:
        raise SettingsError(str(exc)) from None
    try:
        await check_driver(driver)
    except StorageConfigError as exc:
        raise SettingsError(str(exc)) from None
    finally:
        await driver.close()


def _probe_storage(settings: Settings) -> str | None:
    """Write, read and delete a probe in storage, once before serving: why
    it failed in one line, or None. (An unwritable root was accepted, and
    the first push answered 500.)"""
    from registry.ops.health import ProbeFailed, probe_storage
    from storage.config import StorageConfigError, open_driver

    async def probe() -> None:
        driver = open_driver(settings.storage)
        try:
            await probe_storage(driver)
        finally:
            await driver.close()

    try:
        asyncio.run(probe())
    except (ProbeFailed, StorageConfigError) as exc:
        where = settings.storage.root if settings.storage.driver == "filesystem" else settings.storage.driver
        return f"storage is not usable ({where}): {exc}"
    return None


def _announcer(settings: Settings) -> Callable[[str, int], None]:
    scheme = "https" if settings.tls.enabled else "http"

    def announce(host: str, port: int) -> None:
        from registry.ops.configcheck import effective_settings_line

        # once the server stands (a failed start keeps to its one line), once a server
        log.info("%s", effective_settings_line(settings))
        shown = f"[{host}]" if ":" in host else host
        print(f"listening on {scheme}://{shown}:{port}", flush=True)

    return announce


async def _reread_read_only(app) -> None:
    """SIGHUP: lifecycle.read_only as the settings now say (the config file
    and environment read again, off the loop); a settings error keeps the mode."""
    from registry.lifecycle import READ_ONLY

    if _settings_source is None:
        return
    try:
        settings = await asyncio.to_thread(_settings_source)
    except SettingsError as exc:
        log.warning("SIGHUP: settings not re-read, read-only mode left as it was: %s", exc)
        return
    switch = app[READ_ONLY]
    if switch.on != settings.lifecycle.read_only:
        switch.on = settings.lifecycle.read_only
        log.warning("read-only mode %s (SIGHUP)", "on: writes are refused" if switch.on else "off")


# ---- one worker ---------------------------------------------------------------

def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _run_worker(settings: Settings, *, reuse_port: bool,
                announce: Callable[[str, int], None]) -> int:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(settings, reuse_port, announce))
    return 0


async def _serve(settings: Settings, reuse_port: bool,
                 announce: Callable[[str, int], None]) -> None:
    from aiohttp import web

    from registry.app import ServerLog, create_app

    # Storage calls hop to the loop's default executor; with fsync a hop may
    # wait on the disk for a millisecond, so keep more of them in flight than
    # the CPU-bound default (cores + 4) allows.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="dockyard-io"))
    from registry.tls import certificate_watcher, server_context

    ssl_context = server_context(settings.tls)
    app = create_app(settings)
    # the access lines are registry.ops.middleware's (request ID, no credentials)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=_DRAIN_TIMEOUT, logger=ServerLog())
    await runner.setup()
    ops_runner = None
    try:
        if settings.metrics.addr:
            from registry.app import ops_app

            ops_runner = web.AppRunner(ops_app(settings, app), access_log=None, handle_signals=False,
                                       logger=ServerLog())
            await ops_runner.setup()
            ops_host, _, ops_port = settings.metrics.addr.rpartition(":")
            await web.TCPSite(ops_runner, ops_host.strip("[]"), int(ops_port),
                              reuse_port=reuse_port or None).start()
        site = web.TCPSite(runner, settings.http.host, settings.http.port,
                           reuse_port=reuse_port or None, backlog=1024, ssl_context=ssl_context)
        await site.start()
        port = settings.http.port
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            port = server.sockets[0].getsockname()[1]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        from registry.auth.runtime import AUTH

        auth = app[AUTH]

        def hangup() -> None:
            loop.create_task(auth.reload())
            loop.create_task(_reread_read_only(app))

        loop.add_signal_handler(signal.SIGHUP, hangup)
        announce(settings.http.host, port)
        async with certificate_watcher(ssl_context, settings.tls):
            await stop.wait()
    finally:
        if ops_runner is not None:
            await ops_runner.cleanup()
        await runner.cleanup()


# ---- the supervisor -------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _worker_main(settings: Settings, ready: Any, parent_pid: int) -> None:
    # Forked with the stop signals blocked and the supervisor's handlers
    # installed: put the defaults back before letting a pending SIGTERM in.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the group: the parent decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop takes it: re-read auth files
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _die_with_parent()
    if os.getppid() != parent_pid:      # the parent died before prctl took effect
        os._exit(0)
    try:
        code = _run_worker(settings, reuse_port=True, announce=lambda host, port: ready.send(True))
    except OSError as exc:
        print(f"dockyard serve: worker cannot listen on {settings.http.host}:{settings.http.port}: "
              f"{exc.strerror or exc}", file=sys.stderr, flush=True)
        code = 1
    os._exit(code)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) host:port with SO_REUSEPORT: resolves port 0 to one
    port all workers then share, and keeps it ours while they restart."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Workers:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.ctx = multiprocessing.get_context("fork")  # no threads yet; spawn would re-run __main__
        self.procs: dict[int, tuple[Any, float]] = {}   # slot -> (process, started at)

    def start(self, slot: int) -> Any:
        ready, ready_in_child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker_main, args=(self.settings, ready_in_child, os.getpid()),
                                name=f"dockyard-worker-{slot}", daemon=False)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        ready_in_child.close()
        self.procs[slot] = (proc, time.monotonic())
        return ready

    def signal_all(self, signum: int) -> None:
        for proc, _ in self.procs.values():
            if proc.is_alive():
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def stop_all(self) -> None:
        for proc, _ in self.procs.values():
            if proc.is_alive():
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + _STOP_GRACE
        for proc, _ in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc, _ in self.procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _supervise(settings: Settings) -> int:
    reservation = _reserve_port(settings.http.host, settings.http.port)
    port = reservation.getsockname()[1]
    settings = dataclasses.replace(settings, http=dataclasses.replace(settings.http, port=port))

    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    workers = _Workers(settings)
    # SIGHUP: every worker re-reads the auth files
    signal.signal(signal.SIGHUP, lambda signum, frame: workers.signal_all(signal.SIGHUP))
    try:
        events = [workers.start(slot) for slot in range(settings.http.workers)]
        deadline = time.monotonic() + _READY_TIMEOUT
        for slot, ready in enumerate(events):
            while not ready.poll(0.1):
                proc = workers.procs[slot][0]
                if stopping:
                    return 0
                if not proc.is_alive():
                    print(f"dockyard serve: worker {slot} exited with {proc.exitcode} "
                          f"before listening", file=sys.stderr)
                    return 1
                if time.monotonic() > deadline:
                    print(f"dockyard serve: worker {slot} did not start listening within "
                          f"{_READY_TIMEOUT:.0f}s", file=sys.stderr)
                    return 1
        _announcer(settings)(settings.http.host, port)
        quick_deaths = 0
        while not stopping:
            sentinels = {proc.sentinel: slot for slot, (proc, _) in workers.procs.items()}
            for sentinel in multiprocessing.connection.wait(list(sentinels), timeout=0.5):
                if stopping:
                    break
                slot = sentinels[sentinel]
                proc, started = workers.procs[slot]
                proc.join()
                from registry.ops.multiproc import worker_exited

                worker_exited(proc.pid)
                quick_deaths = quick_deaths + 1 if time.monotonic() - started < _RESTART_WINDOW else 0
                if quick_deaths >= _MAX_QUICK_DEATHS:
                    print("dockyard serve: workers keep dying; stopping", file=sys.stderr)
                    return 1
                log.warning("worker %d exited with %s; restarting", slot, proc.exitcode)
                workers.start(slot)
        return 0
    finally:
        workers.stop_all()
        reservation.close()
