"""The OCI runtime config (config.json) of a container, from the image
config, which is untrusted, and the user's settings (`RunSettings`).

The user is looked up in the rootfs' /etc/passwd and /etc/group opened
INSIDE the root (a symlink out of it resolves under the root); the working
directory is canonicalised inside the root and refused under /proc, /sys and
/dev, which the runtime mounts over (`/proc/self/fd/N`-style escapes,
CVE-2024-21626); both through puller.runtime.confine. Image `Volumes` never
become host bind mounts (their data simply stays in the container's private
rootfs). The defaults (capabilities, masked and read-only paths, mounts) are
Docker's.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from puller.runtime.confine import clean_name, open_in_root, resolve_dir
from puller.runtime.errors import ConfigError, ReservedPath, UnpackError

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default capability set
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)
MASKED_PATHS = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
DEFAULT_NOFILE = 1048576
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# the runtime mounts its own filesystems here: nothing from the image may point into them
RUNTIME_MOUNTED = ("proc", "sys", "dev")
INIT_PATH = "/sbin/docker-init"     # where --init's binary is mounted, as docker mounts it


VOLUME_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Volume:
    """A bind mount: `host` is a path that must exist (a file or a directory),
    or for a named volume (`-v NAME:/path`, no slash in NAME) a directory
    under the user's volumes directory, made on first use."""
    host: str
    container: str
    readonly: bool = False
    named: bool = False

    @classmethod
    def parse(cls, spec: str, volumes_dir: str | os.PathLike | None = None) -> "Volume":
        parts = spec.split(":")
        readonly = False
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            readonly = parts[2] == "ro"
            parts = parts[:2]
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise UnpackError(f"invalid volume {spec!r} (want HOST:CONTAINER[:ro] or NAME:CONTAINER[:ro])")
        if not parts[1].startswith("/"):
            raise UnpackError(f"invalid volume {spec!r}: the container path must be absolute")
        source = parts[0]
        if "/" not in source and source not in (".", ".."):
            if not VOLUME_NAME_RE.match(source):
                raise UnpackError(f"invalid volume name {source!r} (letters, digits, '_', '.', '-')")
            if volumes_dir is None:
                raise UnpackError(f"named volume {source!r}: no volumes directory")
            return cls(str(Path(volumes_dir) / source), parts[1], readonly, named=True)
        return cls(os.path.abspath(source), parts[1], readonly)

    def source(self) -> Path:
        """The host path to bind, checked (a named volume's directory is made)."""
        path = Path(self.host)
        if self.named:
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ConfigError(f"volume source {self.host} does not exist "
                              "(create it, or use a named volume NAME:CONTAINER)") from None
        except OSError as exc:
            raise ConfigError(f"volume source {self.host}: {exc.strerror}") from None
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise ConfigError(f"volume source {self.host} is neither a file nor a directory")
        return path.resolve()


@dataclass(frozen=True)
class RunSettings:
    """What the user asks for on top of the image config."""
    command: tuple[str, ...] | None = None      # replaces Cmd
    entrypoint: tuple[str, ...] | None = None   # replaces Entrypoint
    env: tuple[str, ...] = ()                   # K=V, override the image's
    user: str | None = None
    workdir: str | None = None
    volumes: tuple[Volume, ...] = ()
    network: str = "none"                       # "none" (own namespace, loopback) | "host" | "slirp4netns"
    network_path: str | None = None             # join this network namespace (slirp4netns's, puller.runtime.network)
    hostname: str | None = None
    tty: bool = False
    readonly_rootfs: bool = False
    init: str | None = None                     # host path of a static init run as PID 1 (--init)


# -- reading files inside the rootfs


def read_in_root(rootfs: Path, path: str, limit: int = 4 << 20) -> bytes | None:
    """A regular file of the rootfs, resolved inside it; None if missing."""
    rootfd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = open_in_root(rootfd, clean_name(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {path} in the image: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{path} in the image is not a regular file")
            data = os.read(fd, limit + 1)
            if len(data) > limit:
                raise ConfigError(f"{path} in the image is larger than {limit} bytes")
            return data
        finally:
            os.close(fd)
    finally:
        os.close(rootfd)


def _colon_file(data: bytes | None, fields: int) -> list[list[str]]:
    rows = []
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) >= fields:
            rows.append(parts)
    return rows


def _id(text: str) -> int | None:
    if text.isdigit():
        value = int(text)
        if value < 2**32 - 1:
            return value
        raise ConfigError(f"id {text} is out of range")
    return None


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


def resolve_user(rootfs: Path, spec: str | None) -> ResolvedUser:
    """`user`, `uid`, `user:group`, `uid:gid`, `uid:group`, `user:gid` (config.md)."""
    spec = (spec or "").strip()
    user_part, _, group_part = spec.partition(":")
    passwd = _colon_file(read_in_root(rootfs, "/etc/passwd"), 7)
    uid = _id(user_part) if user_part else 0
    entry = None
    if uid is None:
        entry = next((p for p in passwd if p[0] == user_part), None)
        if entry is None:
            raise ConfigError(f"unable to find user {user_part}: no matching entries in passwd file")
    else:
        entry = next((p for p in passwd if p[2] == str(uid)), None)
    if entry is not None:
        uid = _id(entry[2])
        gid = _id(entry[3]) if entry[3].isdigit() else 0
        home = entry[5] or "/"
        name = entry[0]
    else:
        gid, home, name = 0, "/", None
    if uid is None:
        raise ConfigError(f"invalid uid for user {user_part!r} in the image's /etc/passwd")
    extra: list[int] = []
    if group_part:
        gid_value = _id(group_part)
        if gid_value is None:
            groups = _colon_file(read_in_root(rootfs, "/etc/group"), 4)
            match = next((g for g in groups if g[0] == group_part), None)
            if match is None or _id(match[2]) is None:
                raise ConfigError(f"unable to find group {group_part}: no matching entries in group file")
            gid_value = _id(match[2])
        gid = gid_value
    elif name is not None and not user_part.isdigit():
        # supplementary groups only for a named user without an explicit group (conversion.md)
        for g in _colon_file(read_in_root(rootfs, "/etc/group"), 4):
            members = [m.strip() for m in g[3].split(",") if m.strip()]
            gid_value = _id(g[2]) if g[2].isdigit() else None
            if name in members and gid_value is not None and gid_value != gid and gid_value not in extra:
                extra.append(gid_value)
    return ResolvedUser(uid, gid, tuple(extra), home)


def safe_workdir(rootfs: Path, workdir: str | None) -> str:
    """Canonical in-root path for the working directory, created if missing.

    Symlinks are followed inside the root (puller.runtime.confine); the
    result never lies under the runtime's own mounts (/proc, /sys, /dev)."""
    wanted = workdir or "/"
    if not isinstance(wanted, str) or "\0" in wanted:
        raise ConfigError("invalid working directory in the image config")
    try:
        return resolve_dir(rootfs, wanted, reserved=RUNTIME_MOUNTED)
    except ReservedPath as exc:
        raise ConfigError(f"working directory {wanted!r} resolves under /{exc.name}, "
                          "which the runtime mounts over") from None
    except NotADirectoryError:
        raise ConfigError(f"working directory {wanted!r} is not a directory in the image") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"working directory {wanted!r}: too many symlinks") from None
        raise


def _clean_container_path(path: str) -> str:
    cleaned = "/" + clean_name(path.replace("\\", "/")) if path.startswith("/") else None
    if not cleaned:
        raise ConfigError(f"container path {path!r} must be absolute")
    return cleaned


def _merge_env(image_env: Iterable[str], overrides: Iterable[str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in list(image_env or []) + list(overrides or []):
        if not isinstance(item, str) or not item or "\0" in item:
            continue
        key, sep, value = item.partition("=")
        if not key:
            continue
        if not sep:  # `-e NAME` takes the value from our environment, like docker
            if key in os.environ:
                merged[key] = os.environ[key]
            continue
        merged[key] = value
    if "PATH" not in merged:
        merged["PATH"] = DEFAULT_PATH.partition("=")[2]
    return [f"{k}={v}" for k, v in merged.items()]


def _annotations(image_config: dict) -> dict[str, str]:
    cfg = image_config.get("config") or {}
    out: dict[str, str] = {}
    for field_, key in (("os", "os"), ("architecture", "architecture"), ("variant", "variant"),
                        ("os.version", "os.version"), ("author", "author"), ("created", "created")):
        value = image_config.get(field_)
        if isinstance(value, str) and value:
            out[f"org.opencontainers.image.{key}"] = value
    if isinstance(image_config.get("os.features"), list):
        out["org.opencontainers.image.os.features"] = ",".join(map(str, image_config["os.features"]))
    if isinstance(cfg.get("StopSignal"), str):
        out["org.opencontainers.image.stopSignal"] = cfg["StopSignal"]
    if isinstance(cfg.get("ExposedPorts"), dict) and cfg["ExposedPorts"]:
        out["org.opencontainers.image.exposedPorts"] = ",".join(sorted(cfg["ExposedPorts"]))
    for key, value in (cfg.get("Labels") or {}).items():
        if isinstance(key, str) and isinstance(value, str):
            out[key] = value  # labels win over implicit annotations
    return out


def _str_list(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return ["/bin/sh", "-c", value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"image config {what} is not a list of strings")
    return list(value)


def runtime_config(image_config: dict, rootfs: Path, bundle: Path, settings: RunSettings,
                   container_id: str, require_command: bool = True) -> tuple[dict, dict[str, str]]:
    """The OCI runtime config.json for this image and these settings, and the
    bundle files it refers to ({path relative to the bundle: content}); bind
    mount sources name them under `bundle` (the bundle's final path)."""
    cfg = image_config.get("config") or {}
    entrypoint = list(settings.entrypoint) if settings.entrypoint is not None \
        else _str_list(cfg.get("Entrypoint"), "Entrypoint")
    if settings.command is not None:
        cmd = list(settings.command)
    elif settings.entrypoint is not None:
        cmd = []  # a new entrypoint resets the image's Cmd, as docker does
    else:
        cmd = _str_list(cfg.get("Cmd"), "Cmd")
    args = entrypoint + cmd
    if not args and require_command:
        raise ConfigError("no command: the image has no Entrypoint or Cmd, give one")
    if settings.init:
        args = [INIT_PATH, "--", *args]
    user = resolve_user(rootfs, settings.user if settings.user is not None else cfg.get("User"))
    cwd = safe_workdir(rootfs, settings.workdir if settings.workdir is not None else cfg.get("WorkingDir"))
    hostname = settings.hostname or container_id[:12]
    env = _merge_env(cfg.get("Env") or [], [f"HOSTNAME={hostname}", *settings.env])
    if settings.tty and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    if user.home and not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={user.home}")

    host_net = settings.network == "host"
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/sys", "type": "bind", "source": "/sys",
         "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]} if host_net else
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["ro", "nosuid", "noexec", "nodev"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    ]
    # /etc/hostname, /etc/hosts, /etc/resolv.conf: files of the bundle, like docker's
    files = {
        "etc/hostname": hostname + "\n",
        "etc/hosts": ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                      f"127.0.1.1\t{hostname}\n"),
        "etc/resolv.conf": "nameserver 10.0.2.3\n" if settings.network == "slirp4netns" else _resolv_conf(host_net),
    }
    for rel in files:
        mounts.append({"destination": "/" + rel, "type": "bind", "source": str(bundle / rel),
                       "options": ["rbind", "rprivate"]})
    if settings.init:
        mounts.append({"destination": INIT_PATH, "type": "bind", "source": settings.init,
                       "options": ["rbind", "rprivate", "ro"]})
    for volume in settings.volumes:
        dest = _clean_container_path(volume.container)
        if dest == "/" or dest.split("/")[1] in RUNTIME_MOUNTED:
            raise ConfigError(f"cannot mount a volume at {dest}")
        options = ["rbind", "rprivate"] + (["ro"] if volume.readonly else [])
        mounts.append({"destination": dest, "type": "bind", "source": str(volume.source()),
                       "options": options})

    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if not host_net:
        namespaces.append({"type": "network", **({"path": settings.network_path} if settings.network_path else {})})
    caps = list(DEFAULT_CAPABILITIES)
    nofile = _nofile_limit()
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": settings.tty,
            "user": {"uid": user.uid, "gid": user.gid,
                     **({"additionalGids": list(user.additional_gids)} if user.additional_gids else {})},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": False,
        },
        "root": {"path": "rootfs", "readonly": settings.readonly_rootfs},
        "hostname": hostname,
        "mounts": mounts,
        "annotations": _annotations(image_config),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": namespaces,
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    return config, files


def write_bundle_files(directory: Path, config: dict, files: dict[str, str]) -> None:
    for rel, content in files.items():
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        os.chmod(target, 0o644)
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def _nofile_limit() -> int:
    """Docker's 1048576, unless our own hard limit is lower (raising it needs
    CAP_SYS_RESOURCE, which a nested host may not grant)."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return DEFAULT_NOFILE
    return min(DEFAULT_NOFILE, hard)


def _resolv_conf(host_net: bool) -> str:
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError:
        text = ""
    if host_net:
        return text
    # a private network namespace cannot reach the host's loopback resolvers
    lines = [l for l in text.splitlines()
             if not (l.startswith("nameserver") and (" 127." in l or " ::1" in l))]
    return "\n".join(lines) + ("\n" if lines else "")
