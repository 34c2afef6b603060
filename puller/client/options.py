"""What a RegistryClient is told: transport, retries, limits, credentials."""

from __future__ import annotations

from dataclasses import dataclass

from puller.client.auth import Credentials
from storage.oci.content import MAX_DOCUMENT_SIZE

MiB = 1024 * 1024
MAX_MANIFEST_SIZE = MAX_DOCUMENT_SIZE    # manifests, indexes, configs, referrers lists: read whole
USER_AGENT = "dockyard/0.1"


@dataclass(frozen=True)
class ClientOptions:
    plain_http: bool = False            # never TLS
    insecure: bool = False              # TLS without verification
    ca_file: str | None = None          # extra CA bundle
    concurrency: int = 6                # parallel blob transfers
    retries: int = 5                    # per request / per blob (resumed)
    max_manifest_size: int = MAX_MANIFEST_SIZE   # every JSON document read whole: manifests, configs
    connect_timeout: float = 30.0
    read_timeout: float = 300.0         # between two reads of a body
    docker_config: str | None = None    # directory holding config.json (default $DOCKER_CONFIG, ~/.docker)
    credentials: tuple[tuple[str, Credentials], ...] = ()   # (registry, creds) overriding the config
    user_agent: str = USER_AGENT
    chunk_size: int = MiB               # read / hash / write granularity
    upload_chunk_size: int = 16 * MiB   # PATCH size for large uploads
    monolithic_limit: int = 16 * MiB    # blobs up to this size are uploaded with one PUT

    def credentials_for(self, registry: str) -> Credentials | None:
        for name, creds in self.credentials:
            if name == registry:
                return creds
        return None
