"""The test support itself: launchers that take settings files, the
throwaway CA, the token issuer, the raw HTTP helpers and the Ceph S3
gateway, against real processes on loopback."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import yaml

from tests.support import rawhttp
from tests.support.launch import free_port, launch_distribution
from tests.support.registry_http import http_request, push_blob
from tests.support.tls import CertificateAuthority
from tests.support.tokens import TokenIssuer, parse_scope


def test_dockyard_from_a_settings_mapping(start_dockyard, tmp_path):
    port = free_port()
    server = start_dockyard(config={"http": {"port": port}, "storage": {"root": str(tmp_path / "root")}})
    assert server.host == f"127.0.0.1:{port}" and server.storage == tmp_path / "root"
    assert yaml.safe_load(server.config.read_text())["http"]["port"] == port
    digest = push_blob(server.url, "support/mapping", b"bytes")
    assert (tmp_path / "root" / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data").is_file()


def test_dockyard_from_a_settings_file_and_a_flag(start_dockyard, tmp_path):
    config = tmp_path / "dockyard.yml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "from-file")},
                                      "limits": {"catalog_max_entries": 1}}))
    server = start_dockyard(tmp_path / "from-flag", config=config)     # the flag wins over the file
    assert server.config == config
    push_blob(server.url, "a/one", b"1")
    push_blob(server.url, "b/two", b"2")
    page = http_request("GET", f"{server.url}/v2/_catalog")
    assert page.json() == {"repositories": ["a/one"]} and "Link" in page.headers
    assert (tmp_path / "from-flag" / "docker").is_dir() and not (tmp_path / "from-file").exists()


@pytest.mark.interop
def test_distribution_from_a_mapping_and_from_a_file(tmp_path):
    merged = launch_distribution(tmp_path / "merged", config={"storage": {"delete": {"enabled": False}}})
    try:
        digest = push_blob(merged.url, "support/dist", b"kept")
        assert http_request("DELETE", f"{merged.url}/v2/support/dist/blobs/{digest}").status == 405
    finally:
        merged.stop()
    port = free_port()
    config = tmp_path / "own.yml"
    config.write_text(yaml.safe_dump({
        "version": "0.1", "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "own-root")}},
        "http": {"addr": f"127.0.0.1:{port}"}}))
    own = launch_distribution(tmp_path / "own", config=config)
    try:
        assert own.host == f"127.0.0.1:{port}" and own.storage == tmp_path / "own-root"
        push_blob(own.url, "support/own", b"x")
        assert (tmp_path / "own-root" / "docker").is_dir()
    finally:
        own.stop()


@pytest.mark.interop
def test_distribution_takes_environment_variables(tmp_path):
    # Distribution reads REGISTRY_<SECTION>_<KEY> over its file: env reaches it
    server = launch_distribution(tmp_path / "env", env={"REGISTRY_STORAGE_DELETE_ENABLED": "false"})
    try:
        digest = push_blob(server.url, "support/env", b"kept")
        assert http_request("DELETE", f"{server.url}/v2/support/env/blobs/{digest}").status == 405
    finally:
        server.stop()


def test_throwaway_ca_is_trusted_only_by_its_clients(tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    files = ca.issue()
    other = CertificateAuthority(tmp_path / "other").issue()
    server_ctx = files.server_context()
    assert files.names == ("127.0.0.1", "localhost")
    for client_ctx, ok in ((files.client_context(), True), (other.client_context(), False)):
        inbound, outbound = ssl.MemoryBIO(), ssl.MemoryBIO()
        back_in, back_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_ctx.wrap_bio(inbound, outbound, server_hostname="127.0.0.1")
        server = server_ctx.wrap_bio(back_in, back_out, server_side=True)
        error = None
        for _ in range(10):
            for side in (client, server):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    error = exc
            back_in.write(outbound.read())
            inbound.write(back_out.read())
            if error:
                break
        assert (error is None) == ok, error


def test_token_issuer_round_trip(tmp_path):
    issuer = TokenIssuer(tmp_path)
    token = issuer.issue("alice", [{"type": "repository", "name": "a/b", "actions": ["pull"]}])
    claims = issuer.decode(token)
    assert claims["sub"] == "alice" and claims["aud"] == issuer.service
    assert claims["access"] == [{"type": "repository", "name": "a/b", "actions": ["pull"]}]
    assert parse_scope("repository:127.0.0.1:5000/ns/app:pull,push") == \
        ("repository", "127.0.0.1:5000/ns/app", ("pull", "push"))
    with pytest.raises(ValueError):
        parse_scope("repository")


def test_raw_request_in_pieces(start_dockyard):
    server = start_dockyard()
    status, headers, _ = rawhttp.request(server.host, "POST", "/v2/support/raw/blobs/uploads/")
    assert status == 202
    body = b"0123456789" * 100
    patch = rawhttp.RawRequest(server.host, "PATCH", headers["location"],
                               {"Content-Type": "application/octet-stream", "Content-Length": str(len(body))})
    patch.send_in_pieces(body, 300, 0.05)
    status, headers, _ = patch.response()
    assert (status, headers["range"]) == (202, f"0-{len(body) - 1}")
    answer = rawhttp.exchange(server.host, b"NOT HTTP\r\n\r\n")
    assert rawhttp.parse_response(answer)[0] == 400


@pytest.mark.interop
def test_ceph_s3_launcher(tmp_path):
    """A real S3 on loopback: signatures checked (moto checks none), presigned
    URLs, the 5 MiB minimum part, conditional PUT; the gateway paused and
    resumed; stop() leaves nothing running."""
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from tests.support.ceph import MiB, processes_under, start_ceph_s3

    def refusal(call) -> tuple[str, int]:
        with pytest.raises(ClientError) as refused:
            call()
        return refused.value.response["Error"]["Code"], refused.value.response["ResponseMetadata"]["HTTPStatusCode"]

    directory = tmp_path / "ceph"
    with start_ceph_s3(directory, buckets=["launcher"]) as ceph:
        pids = ceph.pids()
        assert set(pids) == {"mon", "osd", "rgw", "watchdog"}
        assert sorted(processes_under(directory)) == sorted(pids.values())
        listening = ceph.listening()
        assert ("127.0.0.1", ceph.port) in listening["rgw"] and ("127.0.0.1", ceph.mon_port) in listening["mon"]
        assert listening["osd"] and not listening["watchdog"]
        assert {host for addresses in listening.values() for host, _ in addresses} == {"127.0.0.1"}
        assert ceph.endpoint == f"http://127.0.0.1:{ceph.port}" and ceph.region == "us-east-1"

        s3 = ceph.client()
        s3.put_object(Bucket="launcher", Key="greeting", Body=b"hello")
        assert s3.get_object(Bucket="launcher", Key="greeting")["Body"].read() == b"hello"
        ceph.create_bucket("second")
        ceph.create_bucket("second")                    # ours already: a no-op
        assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == {"launcher", "second"}

        wrong_key = ceph.client(secret_key=ceph.secret_key[::-1])
        assert refusal(lambda: wrong_key.get_object(Bucket="launcher", Key="greeting")) == \
            ("SignatureDoesNotMatch", 403)

        url = s3.generate_presigned_url("get_object", Params={"Bucket": "launcher", "Key": "greeting"},
                                        ExpiresIn=300)
        assert http_request("GET", url).body == b"hello"
        last = url[-1]
        for tampered in (url[:-1] + ("0" if last != "0" else "1"),         # the signature
                         url.replace("/launcher/greeting?", "/launcher/other?")):   # the key it signs
            answer = http_request("GET", tampered)
            assert answer.status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in answer.body, answer

        upload = s3.create_multipart_upload(Bucket="launcher", Key="parts")["UploadId"]
        parts = [{"PartNumber": number,
                  "ETag": s3.upload_part(Bucket="launcher", Key="parts", UploadId=upload, PartNumber=number,
                                         Body=bytes([number]) * size)["ETag"]}
                 for number, size in ((1, MiB), (2, 10))]
        assert refusal(lambda: s3.complete_multipart_upload(
            Bucket="launcher", Key="parts", UploadId=upload, MultipartUpload={"Parts": parts})) == \
            ("EntityTooSmall", 400)
        s3.abort_multipart_upload(Bucket="launcher", Key="parts", UploadId=upload)

        assert refusal(lambda: s3.put_object(Bucket="launcher", Key="greeting", Body=b"other",
                                             IfNoneMatch="*")) == ("PreconditionFailed", 412)
        assert s3.get_object(Bucket="launcher", Key="greeting")["Body"].read() == b"hello"
        s3.put_object(Bucket="launcher", Key="fresh", Body=b"new", IfNoneMatch="*")

        s3.put_object(Bucket="launcher", Key="infrequent", Body=b"ia", StorageClass="STANDARD_IA")
        assert s3.head_object(Bucket="launcher", Key="infrequent")["StorageClass"] == "STANDARD_IA"
        assert refusal(lambda: s3.put_object(Bucket="launcher", Key="cold", Body=b"g", StorageClass="GLACIER")) == \
            ("InvalidArgument", 400)

        quick = ceph.client(connect_timeout=1, read_timeout=1)
        for how, failure in (("freeze", ReadTimeoutError), ("down", EndpointConnectionError)):
            ceph.pause(how)
            with pytest.raises(failure):
                quick.get_object(Bucket="launcher", Key="greeting")
            ceph.resume()
            assert quick.get_object(Bucket="launcher", Key="greeting")["Body"].read() == b"hello"
        pids = ceph.pids()          # radosgw was started again
        ceph.pause("freeze")        # stop() ends a frozen gateway too
    assert processes_under(directory) == []
    assert not [pid for pid in pids.values() if Path(f"/proc/{pid}").exists()]
    assert "--- rgw.out ---" in ceph.log() and "client.rgw.log" in ceph.log()


@pytest.mark.interop
def test_ceph_s3_ends_with_the_process_that_started_it(tmp_path):
    """A test process killed outright (no atexit, no fixture teardown) leaves
    no Ceph daemon behind: the cluster's watchdog ends them."""
    import subprocess
    import sys
    import time

    from tests.support import REPO_ROOT
    from tests.support.ceph import ceph_programs, processes_under

    ceph_programs()                 # skip (or fail) here, not in the child, without Ceph
    directory = tmp_path / "ceph"
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from tests.support.ceph import start_ceph_s3\n"
         "ceph = start_ceph_s3(sys.argv[1])\n"
         "print(' '.join(map(str, ceph.pids().values())), flush=True)\n"
         "time.sleep(300)\n", str(directory)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in child.stdout.readline().split()]
        assert len(pids) == 4 and sorted(set(processes_under(directory)) - {child.pid}) == sorted(pids)
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 10
    while processes_under(directory) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_under(directory) == []


@pytest.mark.interop
def test_ceph_s3_session_cluster(ceph_s3):
    """The session's cluster: one, with its bucket, whoever asks first."""
    from tests.support.ceph import shared_ceph

    assert shared_ceph.get() is ceph_s3
    assert ceph_s3.client().head_bucket(Bucket=shared_ceph.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
