"""Support code shared by every test folder and the benchmarks.

    tests.support.peers      real peer tools: find or skip/fail, run, docker/podman/skopeo helpers
    tests.support.launch     processes: ServerProcess, Dockyard and CNCF Distribution on loopback
    tests.support.content    digests, media types, tar layers, image configs, OCI layouts
    tests.support.registry_http  one request by urllib (any status), push_blob, put_manifest
    tests.support.rawhttp    HTTP/1.1 by hand over a socket: pieces, pauses, raw bytes
    tests.support.tls        a throwaway certificate authority and server certificates
    tests.support.tokens     a Docker token issuer (JWTs) and its token endpoint
    tests.support.secure_registry  Dockyard with TLS and token auth where Docker verifies it (::1, certs.d)
    tests.support.drivers    the registry of storage drivers every storage test runs over
    tests.support.rrproxy    a round-robin HTTP proxy: each request to the next backend
    tests.support.replicas   several `dockyard serve` over one storage, the proxy before them

Nothing here imports the client (`puller`); what a module needs from the
server side it imports where it is used.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]     # the checkout
