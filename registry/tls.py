"""TLS for `dockyard serve`: the server's context from `tls.*`, and the
watcher that re-reads a renewed certificate without a restart.

A context is built in each worker process (they share nothing). A renewal
is loaded into the same context, so connections made afterwards present the
new certificate while open ones keep theirs; a pair that does not load (a
half-written renewal) is logged and the old one kept, to be tried again at
the next look.
"""

from __future__ import annotations

import _ssl
import asyncio
import contextlib
import ctypes
import logging
import os
import ssl

from registry.settings import SettingsError, TlsSettings

log = logging.getLogger("dockyard.serve")


def server_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The server's TLS context, None without tls.cert; SettingsError (one
    line naming the file) when the files cannot be used."""
    if not tls.enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ciphersuites:
        set_tls13_ciphersuites(context, tls.ciphersuites)
    _load_pair(context, tls)
    if tls.client_ca:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"tls.client_ca {tls.client_ca}: {_reason(exc)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def set_tls13_ciphersuites(context: ssl.SSLContext, suites: str) -> bool:
    """Offer the TLS 1.3 cipher suites `suites` ("A:B:C") in the server's
    order of preference. Python 3.11's ssl module has no call for TLS 1.3
    suites (set_ciphers covers TLS 1.2 and older), so this calls OpenSSL's
    SSL_CTX_set_ciphersuites on the context's SSL_CTX, from the very libssl
    the ssl module uses (symbols looked up through _ssl's own handle). The
    SSL_CTX pointer is the field right after the object's header; it is
    used only after SSL_CTX_get_options through it matches the context's
    options, so a Python whose layout differs gets OpenSSL's order and a
    warning, never a wrong pointer. False when not applied."""
    try:
        libssl = ctypes.CDLL(_ssl.__file__)
        get_options, set_suites = libssl.SSL_CTX_get_options, libssl.SSL_CTX_set_ciphersuites
    except (OSError, AttributeError) as exc:
        log.warning("tls.ciphersuites: OpenSSL's SSL_CTX_set_ciphersuites is not reachable (%s): "
                    "OpenSSL's default order is used", exc)
        return False
    get_options.argtypes, get_options.restype = [ctypes.c_void_p], ctypes.c_uint64
    set_suites.argtypes, set_suites.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or get_options(pointer) != context.options:
        log.warning("tls.ciphersuites: this Python's SSL context layout is not the expected one: "
                    "OpenSSL's default order is used")
        return False
    if set_suites(pointer, suites.encode()) != 1:
        raise SettingsError(f"tls.ciphersuites: OpenSSL refused {suites!r}")
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return True


def _load_pair(context: ssl.SSLContext, tls: TlsSettings) -> None:
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"tls.cert {tls.cert} / tls.key {tls.key}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return "not a PEM certificate chain and its matching private key"
    return getattr(exc, "strerror", None) or str(exc)


def _stamp(tls: TlsSettings) -> tuple:
    stamps = []
    for path in (tls.cert, tls.key):
        try:
            st = os.stat(path)
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


@contextlib.asynccontextmanager
async def certificate_watcher(context: ssl.SSLContext | None, tls: TlsSettings):
    """While the block runs, look at cert and key every reload_interval
    seconds and load a changed pair into the context."""
    if context is None or tls.reload_interval <= 0:
        yield
        return

    async def watch() -> None:
        seen = _stamp(tls)
        while True:
            await asyncio.sleep(tls.reload_interval)
            now = await asyncio.to_thread(_stamp, tls)
            if now == seen:
                continue
            try:
                await asyncio.to_thread(_load_pair, context, tls)
            except SettingsError as exc:
                log.warning("renewed certificate not loaded, keeping the old one: %s", exc)
                continue        # seen stays: tried again at the next look
            seen = now
            log.info("certificate re-read from %s", tls.cert)

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
