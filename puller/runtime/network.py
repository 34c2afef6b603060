"""`--network slirp4netns`: outbound access without root, through a user-mode
TCP/IP stack (slirp4netns), as rootless podman gives it.

    with slirp_network() as netns_path:   # /proc/PID/ns/net of a holder process
        config["linux"]["namespaces"] += [{"type": "network", "path": netns_path}]

The network namespace is made before the container, by a holder process
(`unshare --net` then a sleep) that slirp4netns attaches a tap device to
(10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3); the runtime joins it by
path (runtime-spec config-linux.md "Namespaces": `path`). The host's
loopback is refused (--disable-host-loopback): a container must not reach
services bound to 127.0.0.1 on the host. Both processes end with the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from puller.runtime.errors import RunError

SLIRP_DNS = "10.0.2.3"
TUN = "/dev/net/tun"
READY_TIMEOUT = 10.0


@contextlib.contextmanager
def slirp_network():
    slirp = shutil.which("slirp4netns")
    unshare = shutil.which("unshare")
    if slirp is None:
        raise RunError("--network slirp4netns needs slirp4netns on PATH (Debian: slirp4netns)")
    if unshare is None:
        raise RunError("--network slirp4netns needs unshare (util-linux) on PATH")
    if not os.access(TUN, os.R_OK | os.W_OK):
        mode = ""
        with contextlib.suppress(OSError):
            mode = f" (mode {os.stat(TUN).st_mode & 0o777:04o} here)"
        raise RunError(f"--network slirp4netns needs {TUN} readable and writable by this user{mode}; "
                       "use --network none, or make it 0666 as distributions do")
    holder = subprocess.Popen([unshare, "--net", "--", "sleep", "infinity"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    stack = None
    try:
        netns = _wait_for_new_netns(holder)
        read_end, write_end = os.pipe()
        try:
            stack = subprocess.Popen([slirp, "--configure", "--mtu=65520", "--disable-host-loopback",
                                      f"--ready-fd={write_end}", str(holder.pid), "tap0"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     pass_fds=(write_end,), start_new_session=True)
            os.close(write_end)
            write_end = -1
            _wait_ready(stack, read_end)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        yield netns
    finally:
        for proc in (stack, holder):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def _wait_for_new_netns(holder: subprocess.Popen) -> str:
    """/proc/PID/ns/net once the holder runs in its own namespace (unshare has exec'd sleep)."""
    ours = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + READY_TIMEOUT
    path = f"/proc/{holder.pid}/ns/net"
    while time.monotonic() < deadline:
        if holder.poll() is not None:
            raise RunError(f"cannot create a network namespace: {_last_line(holder)}")
        with contextlib.suppress(OSError):
            if os.readlink(path) != ours and Path(f"/proc/{holder.pid}/comm").read_text().strip() == "sleep":
                return path
        time.sleep(0.005)
    raise RunError("cannot create a network namespace: timed out")


def _wait_ready(stack: subprocess.Popen, read_end: int) -> None:
    import select
    ready, _, _ = select.select([read_end], [], [], READY_TIMEOUT)
    if not ready or os.read(read_end, 1) != b"1":
        if stack.poll() is None:
            stack.kill()
        stack.wait()
        raise RunError(f"slirp4netns did not bring the network up: {_last_line(stack)}")


def _last_line(proc: subprocess.Popen) -> str:
    try:
        text = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    except (OSError, ValueError):
        text = ""
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"
