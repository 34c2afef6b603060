"""The distribution API by hand, one urllib request at a time, for what a
client tool cannot be made to send. Every status is returned, none raised."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Mapping

from tests.support.content import OCI_MANIFEST, sha256_digest


@dataclass(frozen=True)
class HttpResult:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def http_request(method: str, url: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float = 60) -> HttpResult:
    """One HTTP request; 4xx and 5xx come back as results too."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return HttpResult(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        return HttpResult(exc.code, exc.headers, exc.read())


def push_blob(base_url: str, repo: str, data: bytes) -> str:
    """Start an upload, then PUT the whole blob with ?digest=; its digest."""
    digest = sha256_digest(data)
    started = http_request("POST", f"{base_url}/v2/{repo}/blobs/uploads/", b"",
                           {"Content-Length": "0"})
    assert started.status == 202, (started.status, started.body[:500])
    location = started.headers["Location"]
    if location.startswith("/"):
        location = base_url + location
    separator = "&" if "?" in location else "?"
    done = http_request("PUT", f"{location}{separator}digest={digest}", data,
                        {"Content-Type": "application/octet-stream"})
    assert done.status == 201, (done.status, done.body[:500])
    return digest


def put_manifest(base_url: str, repo: str, reference: str, manifest: dict | bytes,
                 media_type: str = OCI_MANIFEST) -> HttpResult:
    """PUT a manifest (a dict is sent as sorted-key JSON) under a tag or digest."""
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest, sort_keys=True).encode()
    return http_request("PUT", f"{base_url}/v2/{repo}/manifests/{reference}", body,
                        {"Content-Type": media_type})
