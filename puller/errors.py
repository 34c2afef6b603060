"""The client's errors: one tree, one root. Every failure a user can see
derives from ClientError, and str() of each is the one line the CLI prints
as `dockyard: error: ...`, so a command catches ClientError and nothing else.

    ClientError
    ├── ReferenceError          a reference, tag, digest or platform outside the grammar (also a ValueError)
    ├── AuthError               401/403, a refused realm or redirect, a bad token answer
    │   ├── LoginRequired           anonymous, and the registry wants credentials
    │   └── LoginExpired            the identity token saved at login is refused (revoked, expired)
    ├── CredentialError         stored credentials unreadable or unwritable (config.json, a helper)
    ├── NotFoundError           404: manifest, blob or repository
    ├── ManifestError           a document not to be used: too big, digest mismatch, unsupported
    │   └── ContentError            a missing or malformed field in untrusted OCI JSON
    ├── DigestMismatchError     blob bytes that do not match their digest or size
    ├── RegistryResponseError   any other unexpected answer; a redirect or Location refused
    ├── TransportError          the registry could not be reached, after retries
    │   ├── TransportFailure        one exchange broke below HTTP (refused, reset, timed out, cut short)
    │   └── CertificateError        the server's TLS certificate is not trusted (not worth a retry)
    ├── StoreError              the local store or an OCI layout: missing, inconsistent, or its I/O failed
    └── UnpackError             (puller.runtime.errors) an image could not be unpacked or run

Foreign errors are mapped where they enter, with `raise ... from exc`:
storage.oci's OciError (the shared vocabulary) becomes ContentError or
ReferenceError at puller.oci and puller.client.reference; OSError, ssl and
h11 errors become TransportFailure / CertificateError in the transport;
OSError in the local store becomes StoreError.

Wording a user acts on (which command or flag helps) lives here, with the
error, not in the library that raises it, so the registry client stays
usable from inside the server.

Pure: the standard library only, so any module may raise these without
loading the HTTP client.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of every client failure; str() is one line for the user."""


class ReferenceError(ClientError, ValueError):
    """A reference, tag, digest or platform that does not follow the grammar."""


class AuthError(ClientError):
    """Authentication failed or was refused."""


class LoginRequired(AuthError):
    """The registry asks for credentials and none are known for it."""

    def __init__(self, host: str):
        super().__init__(f"authentication required by {host}: run 'dockyard login {host}'")
        self.host = host


class LoginExpired(AuthError):
    """The token server refused the identity token `dockyard login` saved:
    revoked (the password changed, the user was removed) or expired."""

    def __init__(self, host: str, reason: str = ""):
        why = f" ({reason})" if reason else ""
        super().__init__(f"authentication to {host} failed: the saved login was refused{why}; "
                         f"run 'dockyard login {host}' again")
        self.host = host


class CredentialError(ClientError):
    """Reading or writing stored credentials failed."""


class NotFoundError(ClientError):
    pass


class ManifestError(ClientError):
    pass


class ContentError(ManifestError):
    """Untrusted OCI JSON with a missing or malformed field."""


class DigestMismatchError(ClientError):
    pass


class RegistryResponseError(ClientError):
    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class TransportError(ClientError):
    pass


class TransportFailure(TransportError):
    """One exchange failed below HTTP semantics; a retry may succeed."""


class CertificateError(TransportError):
    """TLS certificate verification failed: retrying will not help, trust will."""

    def __init__(self, host: str, reason: str):
        super().__init__(f"TLS certificate of {host} not trusted ({reason}); use --ca-file or --insecure")
        self.host = host
        self.reason = reason


class StoreError(ClientError):
    """Something missing or inconsistent in the local store or a layout, or its I/O failed."""


def one_line(exc: BaseException) -> str:
    """The first line of str(exc), or its type's name: what a foreign error
    (an OSError, say) says once mapped into the tree."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
