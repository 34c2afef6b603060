"""Settings: defaults, YAML < environment < flags, one-line errors; the
example config in deploy/ is complete and loads."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from registry.settings import Settings, SettingsError, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "deploy" / "config.example.yml"


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    settings = load_settings(environ={})
    assert settings.http.host == "127.0.0.1"
    assert settings.http.port == 5000
    assert settings.http.workers == 1
    assert settings.storage.driver == "filesystem"
    assert settings.storage.root == str(tmp_path / "xdg" / "dockyard" / "registry")
    assert settings.limits.max_manifest_bytes == 4 * 1024 * 1024
    assert settings.limits.referrers_max_entries == 1000
    assert settings.http.send_timeout == 60
    assert settings.http.body_timeout == 60
    assert settings.storage.filesystem.fsync == "data"
    assert load_settings(environ={"DOCKYARD_STORAGE_FILESYSTEM_FSYNC": "full"}).storage.filesystem.fsync == "full"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.http.port = 1  # type: ignore[misc]


def test_layers_file_env_flags(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "http": {"host": "0.0.0.0", "port": 6000, "workers": 3},
        "storage": {"root": "/srv/from-file", "delete_enabled": False},
        "log": {"level": "warning"},
    }))
    settings = load_settings(str(config), environ={})
    assert (settings.http.host, settings.http.port, settings.http.workers) == ("0.0.0.0", 6000, 3)
    assert settings.storage.root == "/srv/from-file" and settings.storage.delete_enabled is False

    env = {"DOCKYARD_HTTP_PORT": "7000", "DOCKYARD_STORAGE_DELETE_ENABLED": "true",
           "DOCKYARD_STORAGE_S3_BUCKET": "bkt", "DOCKYARD_LIMITS_MAX_MANIFEST_BYTES": "8388608"}
    settings = load_settings(str(config), environ=env)
    assert settings.http.port == 7000 and settings.http.host == "0.0.0.0"
    assert settings.storage.delete_enabled is True
    assert settings.storage.s3.bucket == "bkt"
    assert settings.limits.max_manifest_bytes == 8 * 1024 * 1024

    settings = load_settings(str(config), environ=env, overrides={"http": {"port": 8000}})
    assert settings.http.port == 8000 and settings.http.workers == 3


@pytest.mark.parametrize("content, environ, fragment", [
    ("http:\n  prot: 1\n", {}, "unknown setting http.prot"),
    ("http:\n  port: abc\n", {}, "http.port: expected an integer"),
    ("http:\n  port: 70000\n", {}, "http.port must be"),
    ("storage:\n  driver: ftp\n", {}, "storage.driver must be one of"),
    ("storage:\n  driver: s3\n", {}, "storage.s3.bucket must be set"),
    ("storage:\n  filesystem:\n    fsync: sometimes\n", {}, "storage.filesystem.fsync must be one of"),
    ("http: [1, 2]\n", {}, "http: expected a mapping"),
    ("http:\n  port: [1\n", {}, "invalid YAML"),
    ("- just a list\n", {}, "expected a mapping at the top level"),
    ("", {"DOCKYARD_HTTP_RELATIVE_URLS": "maybe"}, "http.relative_urls: expected true/false"),
    ("", {"DOCKYARD_HTTP_WORKERS": "0"}, "http.workers must be"),
    ("", {"DOCKYARD_LOG_LEVEL": "loud"}, "log.level must be one of"),
    ("", {"DOCKYARD_HTTP_SEND_TIMEOUT": "0"}, "http.send_timeout must be at least 1 second"),
    ("", {"DOCKYARD_HTTP_SEND_TIMEOUT": "soon"}, "http.send_timeout: expected an integer"),
    ("http:\n  body_timeout: -5\n", {}, "http.body_timeout must be at least 1 second"),
    ("", {"DOCKYARD_HTTP_BODY_TIMEOUT": "1.5"}, "http.body_timeout: expected an integer"),
    ("limits:\n  referrers_max_entries: 0\n", {}, "limits.referrers_max_entries must be at least 1"),
    ("", {"DOCKYARD_LIMITS_REFERRERS_MAX_ENTRIES": "many"},
     "limits.referrers_max_entries: expected an integer"),
])
def test_errors_are_one_line(tmp_path, content, environ, fragment):
    config = tmp_path / "config.yml"
    config.write_text(content)
    with pytest.raises(SettingsError) as info:
        load_settings(str(config), environ=environ)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_timeouts_and_referrers_page_from_file_and_environment(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"http": {"send_timeout": 30, "body_timeout": 20},
                                      "limits": {"referrers_max_entries": 50}}))
    settings = load_settings(str(config), environ={})
    assert (settings.http.send_timeout, settings.http.body_timeout) == (30, 20)
    assert settings.limits.referrers_max_entries == 50
    env = {"DOCKYARD_HTTP_SEND_TIMEOUT": "5", "DOCKYARD_HTTP_BODY_TIMEOUT": "2",
           "DOCKYARD_LIMITS_REFERRERS_MAX_ENTRIES": "7"}
    settings = load_settings(str(config), environ=env)
    assert (settings.http.send_timeout, settings.http.body_timeout) == (5, 2)
    assert settings.limits.referrers_max_entries == 7


def test_serve_bad_timeout_prints_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "puller", "serve", "--storage", str(tmp_path / "s")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "DOCKYARD_HTTP_BODY_TIMEOUT": "0"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "dockyard serve: http.body_timeout must be at least 1 second, got 0"


def test_missing_config_file(tmp_path):
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(str(tmp_path / "absent.yml"), environ={})


def _leaf_keys(cls, prefix="") -> set[str]:
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def _yaml_keys(data: dict, prefix="") -> set[str]:
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= _yaml_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_example_config_documents_every_key():
    data = yaml.safe_load(EXAMPLE.read_text())
    assert _yaml_keys(data) == _leaf_keys(Settings)
    settings = load_settings(str(EXAMPLE), environ={})
    assert settings.storage.driver == "filesystem"


def _serve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puller", "serve", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_serve_bad_config_prints_one_line(tmp_path):
    config = tmp_path / "bad.yml"
    config.write_text("storage:\n  driver: floppy\n")
    proc = _serve("--config", str(config))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dockyard serve: storage.driver must be one of")


def test_serve_port_in_use_prints_one_line(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _serve("--port", str(port), "--storage", str(tmp_path / "s"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"dockyard serve: cannot listen on 127.0.0.1:{port}")


def test_serve_takes_config_file_then_environment(tmp_path):
    """A real server: port from the file, storage root from the environment."""
    import os
    import time
    import urllib.request

    from tests.support.launch import ServerProcess, free_port

    port = free_port()
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"http": {"port": port},
                                      "storage": {"root": str(tmp_path / "from-file")}}))
    env = {"DOCKYARD_STORAGE_ROOT": str(tmp_path / "from-env"),
           "PYTHONPATH": str(REPO_ROOT)}
    server = ServerProcess([sys.executable, "-m", "puller", "serve", "--config", str(config)],
                           ready_url=f"http://127.0.0.1:{port}/v2/", env=env, cwd=REPO_ROOT,
                           log_path=tmp_path / "serve.log", name="dockyard")
    with server:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/envcheck/blobs/uploads/",
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 202
        deadline = time.monotonic() + 10
        while f"listening on http://127.0.0.1:{port}" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
    assert (tmp_path / "from-env" / "docker" / "registry" / "v2" / "repositories" / "envcheck").is_dir()
    assert not os.path.exists(tmp_path / "from-file" / "docker")
