"""`dockyard mirror sync CONFIG --interval N`: rounds on a schedule, each
printing its summary as it ends (--json: one line each); SIGTERM between rounds stops it cleanly
(exit 0, nothing on stderr); the second round finds every image in place
and moves nothing (one manifest request per tag, not one per blob)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time

from tests.client.test_mirror_bundle import dockyard, manifest_head, push_image, unique
from tests.support import REPO_ROOT
from tests.support.content import random_tar_layer, tar_layer
from tests.support.launch import dockyard_command

ROUNDS_DEADLINE = 60          # seconds for the two rounds, however slow the machine


def test_sync_interval_two_rounds_then_sigterm(dockyard_registry, distribution_registry, tmp_path):
    source, target = dockyard_registry, distribution_registry
    repo, prefix = unique("mirror/interval"), unique("every")
    for tag in ("a", "b"):
        push_image(source.url, repo, [tar_layer({"t": tag.encode()}), random_tar_layer(300_000)], tag)
    config = tmp_path / "sync.yml"
    config.write_text(f"target: {target.host}/{prefix}\nimages:\n  - {source.host}/{repo}:a\n"
                      f"  - {source.host}/{repo}:b\n")
    proc = subprocess.Popen([*dockyard_command(), "mirror", "sync", str(config), "--interval", "2", "--json"],
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                 "DOCKER_CONFIG": "/nonexistent-dockyard-config"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)   # no read-ahead past a line
    rounds = []
    deadline = time.monotonic() + ROUNDS_DEADLINE
    try:
        while len(rounds) < 2 and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.2)[0]:
                rounds.append(json.loads(proc.stdout.readline()))     # one line per round, as it ends
        assert len(rounds) == 2, f"two rounds did not finish in {ROUNDS_DEADLINE}s: {rounds!r}"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0 and stderr == b"", (proc.returncode, stderr)
    first, second = rounds[:2]
    assert (first["copied"], first["failed"]) == (2, 0) and first["bytes_transferred"] > 600_000
    assert (second["copied"], second["unchanged"], second["bytes_transferred"]) == (0, 2, 0)
    for tag in ("a", "b"):
        assert manifest_head(target.url, f"{prefix}/{repo}", tag)


def test_sync_interval_must_be_a_number_of_seconds(tmp_path):
    for bad in ("-1", "nan", "soon"):
        failed = dockyard("mirror", "sync", str(tmp_path / "none.yml"), "--interval", bad, check=False)
        assert failed.returncode == 2 and f"--interval: not a number of seconds: '{bad}'" in failed.stderr


def test_mirror_command_called_in_process_returns_its_code(tmp_path, capsys):
    # the console script ends without interpreter teardown; a caller passing argv gets a return
    from puller.cli import main
    assert main(["mirror", "sync", str(tmp_path / "none.yml")]) == 1
    assert capsys.readouterr().err.startswith("dockyard: error: ")
