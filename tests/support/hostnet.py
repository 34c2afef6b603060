"""What a container's network is checked against: a server on the host's
loopback (a container with slirp4netns must not reach it) and the probe a
container runs to show its routes, gateway, resolver and that server."""

from __future__ import annotations

import contextlib
import http.server
import threading
from typing import Iterator

REFUSED = "host-loopback-refused"
GATEWAY_ANSWERS = "gateway-answers"


@contextlib.contextmanager
def loopback_answer(body: bytes) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 answering every GET with body; its port."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def slirp_probe(port: int) -> str:
    """A shell script for the container: its routes, whether slirp4netns's
    gateway 10.0.2.2 answers, its resolv.conf, and the host's loopback server
    on `port` through that gateway (REFUSED when it cannot be reached)."""
    return (f"cat /proc/net/route; ping -c 1 -W 5 10.0.2.2 >/dev/null && echo {GATEWAY_ANSWERS}; "
            f"cat /etc/resolv.conf; wget -q -T 5 -O- http://10.0.2.2:{port}/ || echo {REFUSED}")
