"""The client's errors: every user-visible failure derives from ClientError,
and str() of each is one line the CLI prints as `dockyard: error: ...`.

    ClientError
     +-- AuthError (puller.auth)       401/403, bad credentials, refused realm
     +-- CredentialError (puller.auth) reading or writing stored credentials
     +-- NotFoundError                 404 manifest/blob/repository
     +-- ManifestError                 not JSON, too big, digest mismatch, unsupported
     |    +-- ContentError (puller.oci)   a missing or malformed field in untrusted OCI JSON
     +-- DigestMismatchError           blob bytes do not match their digest/size
     +-- RegistryResponseError         other unexpected status, a redirect we refuse
     +-- TransportError                connection failures after retries

Pure: no imports beyond the standard library, so the validation module and
the auth module can raise these without loading the HTTP client.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of every client failure; str() is one line for the user."""


class NotFoundError(ClientError):
    pass


class ManifestError(ClientError):
    pass


class DigestMismatchError(ClientError):
    pass


class RegistryResponseError(ClientError):
    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class TransportError(ClientError):
    pass
