"""JSON access logs and request IDs on a real `dockyard serve`: the ID is
the client's X-Request-ID when it is a plain token, else a new one; it is
echoed, it is on every line logged for that request, and no credential
(Basic or Bearer header, token in a query string) reaches the log."""

from __future__ import annotations

import base64
import json
import time

import pytest

from tests.support.rawhttp import RawRequest
from tests.support.registry_http import http_request, push_blob

SECRETS = {"basic": "pw-Zk81-basic", "bearer": "eyJhbGciOi.bearer-secret-9Q", "query": "qs-token-4471"}


def _lines(server, settle: float = 0.3) -> list[dict]:
    time.sleep(settle)
    out = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def json_server(tmp_path_factory):
    from tests.support.launch import launch_dockyard

    root = tmp_path_factory.mktemp("ops-logs")
    server = launch_dockyard(root / "storage", extra_args=("--log-format", "json", "--access-log"),
                             env={"DOCKYARD_HTTP_BODY_TIMEOUT": "1"}, log_path=root / "serve.log")
    yield server
    server.stop()


def test_request_id_taken_echoed_and_logged(json_server):
    answer = http_request("GET", f"{json_server.url}/v2/", headers={"X-Request-ID": "trace-42.a:b"})
    assert answer.headers["X-Request-ID"] == "trace-42.a:b"
    access = [line for line in _lines(json_server) if line.get("request_id") == "trace-42.a:b"]
    assert len(access) == 1
    line = access[0]
    assert line["logger"] == "dockyard.access" and line["status"] == 200 and line["method"] == "GET"
    assert line["path"] == "/v2/" and line["route"] == "/v2/" and line["duration_ms"] >= 0
    assert set(line) >= {"time", "level", "message", "remote", "bytes_sent", "bytes_received"}


@pytest.mark.parametrize("offered", [None, "", "x" * 129, "bad id\u00e9", "a,b"])
def test_request_id_made_when_missing_or_not_a_plain_token(json_server, offered):
    headers = {} if offered is None else {"X-Request-ID": offered.encode("utf-8").decode("latin-1")}
    answer = http_request("GET", f"{json_server.url}/v2/", headers=headers)
    made = answer.headers["X-Request-ID"]
    assert made != offered and len(made) == 32 and int(made, 16) >= 0
    assert any(line.get("request_id") == made for line in _lines(json_server))


def test_streamed_and_error_responses_carry_the_id(json_server):
    digest = push_blob(json_server.url, "logs/app", b"some bytes" * 1000)
    blob = http_request("GET", f"{json_server.url}/v2/logs/app/blobs/{digest}",
                        headers={"X-Request-ID": "blob-get-1"})
    assert blob.status == 200 and blob.headers["X-Request-ID"] == "blob-get-1"
    missing = http_request("GET", f"{json_server.url}/v2/logs/app/manifests/nope",
                           headers={"X-Request-ID": "missing-1"})
    assert missing.status == 404 and missing.headers["X-Request-ID"] == "missing-1"
    assert missing.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    lines = {line.get("request_id"): line for line in _lines(json_server)}
    assert lines["blob-get-1"]["bytes_sent"] == 10000
    assert lines["missing-1"]["status"] == 404


def test_every_line_of_a_request_carries_its_id(json_server):
    """A body that stops arriving is logged by the error path (not the
    access line): that line names the request too."""
    host, port = json_server.host.split(":")
    started = http_request("POST", f"{json_server.url}/v2/logs/slow/blobs/uploads/", b"")
    location = started.headers["Location"]
    stalled = RawRequest((host, int(port)), "PATCH", location,
                         {"Content-Type": "application/octet-stream", "Content-Length": "1000",
                          "X-Request-ID": "stalled-body-7"}, body=b"x" * 10, timeout=15)
    status, headers, _ = stalled.response()
    assert headers.get("x-request-id") == "stalled-body-7"
    mine = [line for line in _lines(json_server) if line.get("request_id") == "stalled-body-7"]
    loggers = {line["logger"] for line in mine}
    assert "dockyard.access" in loggers and len(loggers) >= 2, mine
    assert any("stopped arriving" in line["message"] for line in mine)


def test_no_credential_reaches_the_log(json_server):
    basic = base64.b64encode(f"alice:{SECRETS['basic']}".encode()).decode()
    http_request("GET", f"{json_server.url}/v2/", headers={"Authorization": f"Basic {basic}",
                                                           "X-Request-ID": "cred-basic"})
    http_request("GET", f"{json_server.url}/v2/cred/app/tags/list",
                 headers={"Authorization": f"Bearer {SECRETS['bearer']}", "X-Request-ID": "cred-bearer"})
    http_request("GET", f"{json_server.url}/v2/cred/app/manifests/latest?access_token={SECRETS['query']}"
                        f"&n=5&password={SECRETS['query']}", headers={"X-Request-ID": "cred-query"})
    lines = _lines(json_server)
    ids = {line.get("request_id") for line in lines}
    assert {"cred-basic", "cred-bearer", "cred-query"} <= ids, "the requests were not logged"
    query_line = next(line for line in lines if line.get("request_id") == "cred-query")
    assert query_line["query"] == "access_token=***&n=5&password=***"
    log = json_server.log()
    for secret in [*SECRETS.values(), basic]:
        assert secret not in log, f"{secret[:6]}... is in the log"


def test_text_format_names_the_request_too(start_dockyard, tmp_path):
    server = start_dockyard(tmp_path / "storage", extra_args=("--access-log",))
    http_request("GET", f"{server.url}/v2/?token=t0ps3cret", headers={"X-Request-ID": "text-line-1"})
    time.sleep(0.3)
    line = next(line for line in server.log().splitlines() if "text-line-1" in line)
    assert '"GET /v2/?token=***" 200' in line and line.endswith("request_id=text-line-1")
    assert "t0ps3cret" not in server.log()
