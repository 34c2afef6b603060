"""Strict settings and `dockyard serve --check-config`: every mistake named
by its key, its value and why, in one line; unknown keys and DOCKYARD_*
variables refused (a warning with --lenient); YAML errors keep line and
reason; the effective settings are logged once, secrets masked."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest
import yaml

from registry.ops.configcheck import MASK, effective_settings_line, masked
from registry.settings import Settings, SettingsError, env_names, load_settings
from storage.config import S3Settings, StorageSettings
from tests.support import REPO_ROOT
from tests.support.launch import dockyard_command, free_port


def _serve(*args: str, env=None, timeout: float = 30) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}
    return subprocess.run([*dockyard_command(), "serve", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**clean, "PYTHONPATH": str(REPO_ROOT), **(env or {})})


def _config(tmp_path, data) -> str:
    path = tmp_path / "config.yml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_check_config_passes_a_good_config_without_serving(tmp_path):
    port = free_port()
    config = _config(tmp_path, {"http": {"port": port}, "storage": {"root": str(tmp_path / "s")}})
    proc = _serve("--config", config, "--check-config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "dockyard serve: configuration OK"
    assert "listening" not in proc.stdout
    # it probed storage (made the root) but left no probe behind and no signing key
    health = tmp_path / "s" / "docker" / "registry" / "v2" / "_dockyard" / "health"
    assert health.is_dir() and list(health.iterdir()) == []
    assert not (tmp_path / "s" / "auth").exists()


@pytest.mark.parametrize("content, env, expected", [
    ({"http": {"workers": 0}}, {}, "http.workers must be 1..256, got 0"),
    ({"log": {"format": "xml"}}, {}, "log.format must be one of text, json, got 'xml'"),
    ({"metrics": {"addr": "nowhere"}}, {}, "metrics.addr must be host:port, got 'nowhere'"),
    ({"http": {"prot": 1}}, {}, "unknown setting http.prot"),
    ({"metric": {"enabled": True}}, {}, "unknown setting metric"),
    ({}, {"DOCKYARD_HTTP_PROT": "1"}, "unknown environment variable DOCKYARD_HTTP_PROT"),
    ({}, {"DOCKYARD_STORGE_ROOT": "/x"}, "unknown environment variable DOCKYARD_STORGE_ROOT"),
    ({}, {"DOCKYARD_METRICS_ENABLED": "sometimes"}, "metrics.enabled: expected true/false, got 'sometimes'"),
    ("http:\n  port: 1\n   host: x\n", {}, "line 3 column 8: invalid YAML: mapping values are not allowed here"),
])
def test_check_config_names_key_value_and_reason(tmp_path, content, env, expected):
    config = _config(tmp_path, {"storage": {"root": str(tmp_path / "s")}, **content}
                     if isinstance(content, dict) else content)
    proc = _serve("--config", config, "--check-config", "--storage", str(tmp_path / "s"), env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("dockyard serve: ") and expected in lines[0], lines[0]


def test_lenient_warns_and_goes_on(tmp_path):
    config = _config(tmp_path, {"http": {"prot": 1}, "storage": {"root": str(tmp_path / "s")}})
    proc = _serve("--config", config, "--check-config", "--lenient",
                  env={"DOCKYARD_HTTP_PROT": "2"})
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.strip().splitlines()
    assert warnings == ["dockyard serve: warning: unknown environment variable DOCKYARD_HTTP_PROT ignored",
                        "dockyard serve: warning: unknown setting http.prot ignored"]
    # a bad value stays an error, lenient or not
    config = _config(tmp_path, {"http": {"port": "many"}, "storage": {"root": str(tmp_path / "s")}})
    assert _serve("--config", config, "--check-config", "--lenient").returncode == 2


def test_variables_of_the_client_and_tests_are_not_settings():
    env = {"DOCKYARD_REQUIRE_INTEROP": "1", "DOCKYARD_UNPACK_CACHE": "/x", "DOCKYARD_TEST_DRIVERS": "fs",
           "DOCKYARD_BENCH_CACHE": "/y", "DOCKYARD_HTTP_PORT": "5001"}
    assert load_settings(environ=env).http.port == 5001


def test_env_names_derive_from_the_dataclasses():
    """A section another change adds is known without a list to keep."""
    names = env_names()
    assert {"DOCKYARD_HTTP_PORT", "DOCKYARD_STORAGE_S3_BUCKET", "DOCKYARD_AUTH_TOKEN_REALM",
            "DOCKYARD_METRICS_TOKEN_FILE", "DOCKYARD_LOG_FORMAT"} <= names
    for f in dataclasses.fields(Settings):
        assert any(name.startswith(f"DOCKYARD_{f.name.upper()}_") for name in names), f.name


def test_yaml_error_keeps_line_and_reason(tmp_path):
    config = _config(tmp_path, "storage:\n  root: /x\n  driver: [filesystem\n")
    with pytest.raises(SettingsError) as info:
        load_settings(config, environ={})
    message = str(info.value)
    assert "line 4" in message and "expected ',' or ']'" in message and "\n" not in message


def test_effective_settings_mask_secrets():
    settings = Settings(storage=StorageSettings(driver="s3", s3=S3Settings(
        bucket="b", access_key_id="AKIAEXAMPLEKEY", secret_access_key="s3cr3t-value-xyz")))
    shown = masked(settings)
    assert shown["storage"]["s3"]["secret_access_key"] == MASK
    assert shown["storage"]["s3"]["access_key_id"] == MASK
    assert shown["storage"]["s3"]["bucket"] == "b"
    line = effective_settings_line(settings)
    assert "s3cr3t-value-xyz" not in line and "AKIAEXAMPLEKEY" not in line
    assert "\n" not in line
    from registry.settings import EventEndpointSettings, EventsSettings

    hooks = Settings(events=EventsSettings(endpoints=(EventEndpointSettings(
        url="https://hooks.example/x", headers=("Authorization: Bearer hook-s3cret",)),)))
    shown = masked(hooks)["events"]["endpoints"][0]
    assert shown["headers"] == ["Authorization: ***"] and shown["url"] == "https://hooks.example/x"
    assert "hook-s3cret" not in effective_settings_line(hooks)
    # an empty secret is shown as empty: the operator sees it is unset
    assert masked(Settings())["storage"]["s3"]["secret_access_key"] == ""


@pytest.mark.timeout(60)
def test_effective_settings_logged_once_with_workers(start_dockyard, tmp_path):
    server = start_dockyard(tmp_path / "storage", workers=2)
    server.stop()
    log = server.log()
    assert log.count("effective settings: ") == 1, log
    assert '"workers":2' in log
