"""TLS for `dockyard serve`: the server's context from `tls.*`, and the
watcher that re-reads a renewed certificate without a restart.

A context is built in each worker process (they share nothing). A renewal
is loaded into the same context, so connections made afterwards present the
new certificate while open ones keep theirs; a pair that does not load (a
half-written renewal) is logged and the old one kept, to be tried again at
the next look.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    _load_pair(context, tls)
    if tls.client_ca:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"tls.client_ca {tls.client_ca}: {_reason(exc)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


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
