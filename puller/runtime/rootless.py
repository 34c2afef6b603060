"""`dockyard run` as an ordinary user: the command re-runs itself inside a
user namespace it owns (with a mount namespace), as `podman unshare` does,
and from there unpacks, mounts the overlay and starts runc/crun as the
namespace's root.

    enter_user_namespace()       execs `unshare ... -- python -m puller ARGS`; returns only on failure
    current()                    the RootlessMode we run in, or None (not rootless)

Mappings (runtime-spec config-linux.md "User namespace mappings"): with a
range for the user in /etc/subuid and /etc/subgid and newuidmap/newgidmap
installed, the user is root and the range is IDs 1..N (`unshare --map-auto`):
files keep the image's owners inside the namespace. Without a range, the one
ID of the user is root and nothing else is mapped: files are all root's and
the container's process must run as root (a clear error otherwise).

What runc/crun then need (runtime-spec config-linux.md, "rootless" use):
no cgroup they cannot write (they run in rootless cgroup mode inside a user
namespace and skip the controllers), /sys/fs/cgroup bind-mounted instead of a
new cgroup v1 mount (refused in a user namespace), a state directory the user
owns. Network: `none` (a private namespace with loopback) or `slirp4netns`.
When the host forbids user namespaces, the error names the sysctl.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from puller.runtime.errors import RunError

ENV = "DOCKYARD_ROOTLESS"       # set for the re-run inside the namespace: "<outer uid>:<subids|single>"
PROC_SYS = Path("/proc/sys")


@dataclass(frozen=True)
class RootlessMode:
    outer_uid: int
    subids: bool                # a range of IDs is mapped (else only the user, as root)


def current() -> RootlessMode | None:
    value = os.environ.get(ENV)
    if not value or os.geteuid() != 0:
        return None
    uid, _, mode = value.partition(":")
    if not uid.isdigit() or mode not in ("subids", "single"):
        return None
    return RootlessMode(int(uid), mode == "subids")


def blocking_sysctl(proc_sys: Path = PROC_SYS) -> str | None:
    """The sysctl setting that forbids an unprivileged user namespace, if one does."""
    checks = (("user/max_user_namespaces", "0", "user.max_user_namespaces", "a positive number"),
              ("kernel/unprivileged_userns_clone", "0", "kernel.unprivileged_userns_clone", "1"),
              ("kernel/apparmor_restrict_unprivileged_userns", "1",
               "kernel.apparmor_restrict_unprivileged_userns", "0"))
    for rel, forbidding, name, wanted in checks:
        try:
            value = (proc_sys / rel).read_text().strip()
        except OSError:
            continue
        if value == forbidding:
            return f"{name} is {value} (set it to {wanted}: sysctl -w {name}=...)"
    return None


def _has_subids(user: str, uid: int) -> bool:
    def listed(path: str) -> bool:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            return False
        for line in lines:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[0] in (user, str(uid)) and parts[2].isdigit() and int(parts[2]) > 0:
                return True
        return False
    return (listed("/etc/subuid") and listed("/etc/subgid")
            and shutil.which("newuidmap") is not None and shutil.which("newgidmap") is not None)


def unshare_argv() -> tuple[list[str], RootlessMode]:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    subids = _has_subids(user, uid)
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RunError("running containers without root needs unshare (util-linux) on PATH")
    argv = [unshare, "--user", "--mount", "--map-root-user"] + (["--map-auto"] if subids else [])
    return argv, RootlessMode(uid, subids)


def enter_user_namespace() -> None:
    """Re-run this command (`python -m puller ARGS`) inside a user and mount
    namespace of our own; only returns by raising RunError."""
    why = blocking_sysctl()
    if why:
        raise RunError(f"rootless run needs user namespaces, which this host forbids: {why}")
    argv, mode = unshare_argv()
    probe = subprocess.run([*argv, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        detail = (probe.stderr.strip().splitlines() or ["failed"])[-1]
        raise RunError(f"cannot create a user namespace ({detail}); "
                       f"{blocking_sysctl() or 'check user.max_user_namespaces and /etc/subuid'}")
    env = {**os.environ, ENV: f"{mode.outer_uid}:{'subids' if mode.subids else 'single'}"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], [*argv, "--", sys.executable, "-m", "puller", *sys.argv[1:]], env)


def state_root(mode: RootlessMode, runtime_name: str) -> Path:
    """A state directory only the user owns: $XDG_RUNTIME_DIR, else /tmp/dockyard-UID
    (refused when someone else made it, or it is a symlink)."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isdir(runtime_dir):
        return Path(runtime_dir) / "dockyard" / runtime_name
    base = Path(f"/tmp/dockyard-{mode.outer_uid}")
    try:
        base.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RunError(f"{base} is not a private directory of this user: remove it, or set XDG_RUNTIME_DIR")
    return base / runtime_name


def check_process_user(mode: RootlessMode | None, config: dict) -> None:
    """With only the user's own ID mapped, the container runs as root or not at all."""
    if mode is None or mode.subids:
        return
    user = config["process"]["user"]
    ids = {user["uid"], user["gid"], *user.get("additionalGids", ())}
    if ids != {0}:
        raise RunError(f"user {user['uid']}:{user['gid']} is not mapped in the user namespace: only root is, "
                       "as no range for this user is in /etc/subuid and /etc/subgid (add one, or run with -u 0)")


def adapt_config(mode: RootlessMode | None, config: dict) -> None:
    """The runtime config's changes for a container inside our user namespace."""
    if mode is None:
        return
    for mount in config["mounts"]:
        if mount["destination"] == "/sys/fs/cgroup" and mount["type"] == "cgroup":
            # a new cgroup v1 mount is refused in a user namespace: the host's view, read-only
            mount.update(type="bind", source="/sys/fs/cgroup", options=["rbind", "nosuid", "noexec", "nodev", "ro"])
        if mount["type"] == "devpts" and not mode.subids:
            mount["options"] = [o for o in mount["options"] if o != "gid=5"]   # gid 5 is not mapped
    # the device cgroup cannot be written from here; the runtime's own device list still applies
    config["linux"].get("resources", {}).pop("devices", None)
