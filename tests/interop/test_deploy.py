"""deploy/, exercised: the Kubernetes manifests validated against the
Kubernetes schemas (kubernetes-validate, offline, strict), the ConfigMap's
settings accepted by `dockyard serve --check-config` and the probes the
Deployment names answered by a server started with them, and the systemd
unit accepted by `systemd-analyze verify`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import REPO_ROOT
from tests.support.launch import dockyard_command
from tests.support.peers import require_tool
from tests.support.registry_http import http_request

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"


def _documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_kubernetes_manifests_pass_the_schemas():
    tool = shutil.which("kubernetes-validate", path=os.path.dirname(sys.executable)) \
        or require_tool("kubernetes-validate")
    files = sorted(str(p) for p in KUBERNETES.glob("*.yaml"))
    assert {Path(f).stem for f in files} >= {"deployment", "service", "configmap", "pvc", "s3-secret", "ingress"}
    proc = subprocess.run([tool, "--strict", *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(files), proc.stdout


def test_kubernetes_validation_catches_a_broken_manifest(tmp_path):
    """The check can fail: a misspelt field is refused in strict mode."""
    tool = shutil.which("kubernetes-validate", path=os.path.dirname(sys.executable)) \
        or require_tool("kubernetes-validate")
    deployment = yaml.safe_load((KUBERNETES / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    broken = tmp_path / "deployment.yaml"
    broken.write_text(yaml.safe_dump(deployment))
    proc = subprocess.run([tool, "--strict", str(broken)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0


def test_deployment_probes_and_config_work_on_a_real_server(tmp_path, start_dockyard):
    docs = _documents()
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    settings = yaml.safe_load(docs["ConfigMap"]["data"]["config.yml"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "storage")["mountPath"]
    assert settings["storage"]["root"].startswith(mount), "storage root outside the volume"
    # the ConfigMap's settings, on loopback and a temporary root
    settings["http"].update(host="127.0.0.1", port=0)
    settings["storage"]["root"] = str(tmp_path / "storage")
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}
    proc = subprocess.run([*dockyard_command(), "serve", "--config", str(config), "--check-config"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr
    del settings["http"]["port"]
    server = start_dockyard(config=settings)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        path = container[probe]["httpGet"]["path"]
        assert http_request("GET", f"{server.url}{path}").status == 200, probe
    assert http_request("GET", f"{server.url}/metrics").status == 200
    assert server.log().lstrip().startswith("{"), "log.format json from the ConfigMap"


def test_systemd_unit_verifies(tmp_path):
    analyze = require_tool("systemd-analyze")
    unit = (REPO_ROOT / "deploy" / "dockyard.service").read_text()
    exec_line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    binary = exec_line.split("=", 1)[1].split()[0]
    # the one change: where this machine has the dockyard command
    here = shutil.which("dockyard", path=os.path.dirname(sys.executable)) or shutil.which("dockyard")
    if here is None:
        pytest.fail("no dockyard command installed next to this Python")
    copy = tmp_path / "dockyard.service"
    copy.write_text(unit.replace(binary, here))
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if "dockyard.service" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
    # and it can fail: a unit with an unknown setting in [Service]
    copy.write_text(unit.replace(binary, here).replace("[Service]", "[Service]\nExecStartt=/bin/true"))
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert "ExecStartt" in proc.stdout + proc.stderr
