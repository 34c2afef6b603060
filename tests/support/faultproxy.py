"""A loopback TCP proxy that forwards to one upstream address and can break
one connection on demand: a real network fault for retry tests.

    with FaultProxy(("127.0.0.1", ceph.port)) as proxy:
        proxy.cut_once(after=1 << 20)     # arm it
        ...                               # S3 calls through proxy.url
        assert proxy.cuts == 1

`cut_once(after=N)`: the first connection that carries N more bytes from
the client after arming (a request body: a part upload, not a HEAD) is
reset in the middle (SO_LINGER 0: an RST, as a dropped link or a crashed
load balancer gives), once. Every other byte is forwarded as it is. One
thread per direction of each connection; the listener and every
connection end with `close()`.
"""

from __future__ import annotations

import socket
import struct
import threading

_CHUNK = 64 << 10


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed: int | None = None
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self.cuts = 0
        self.connections = 0
        threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_once(self, after: int) -> None:
        """Reset the first connection that carries `after` more client bytes."""
        with self._lock:
            self._armed = after

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return                                      # closed
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self.connections += 1
                self._sockets.update((client, server))
            state = {"sent": 0}
            threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, state: dict, upstream: bool) -> None:
        try:
            while data := source.recv(_CHUNK):
                if upstream and self._should_cut(state, len(data)):
                    self._reset(source, sink)
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # one side ended: end the other too, as a proxy does
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _should_cut(self, state: dict, size: int) -> bool:
        with self._lock:
            if self._armed is None:
                return False
            state["sent"] += size
            if state["sent"] < self._armed:
                return False
            self._armed = None
            self.cuts += 1
            return True

    def _reset(self, *socks: socket.socket) -> None:
        for sock in socks:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._sockets = list(self._sockets), set()
        self._listener.close()
        for sock in socks:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
