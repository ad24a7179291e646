"""The report page of `echo-serve --ui`: one static page and a same-origin pass-through to Triton.

The page (static/index.html) shows the dropped chest X-ray and streams its report block by block
from Triton's KServe v2 `generate_stream` endpoint of the decoupled `echo_stream` model
(server-sent events), with the time and forward passes. This server only hands out the page
and forwards /v2/... requests to Triton's HTTP port unchanged, streaming the answer back (a
browser may not call another origin without CORS headers, which Triton does not send).
Standard library only.
"""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

PAGE = Path(__file__).with_name("static") / "index.html"
MAX_BODY = 64 * 1024 * 1024  # a base64 DICOM of a 30 MB radiograph fits


class ReportPageHandler(BaseHTTPRequestHandler):
    """The page, and every /v2/... request passed on to Triton at `target` (make_handler sets it)."""

    protocol_version = "HTTP/1.1"
    target = urlsplit("http://127.0.0.1:8000")

    def log_message(self, *args) -> None:  # quiet: Triton logs the requests that matter
        pass

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path.startswith("/v2/"):
            self._forward(b"")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if not self.path.startswith("/v2/"):
            self._send(404, b"not found\n", "text/plain")
        elif n > MAX_BODY:
            self._send(413, f"request body over {MAX_BODY} bytes\n".encode(), "text/plain")
        else:
            self._forward(self.rfile.read(n))

    def _forward(self, body: bytes) -> None:
        conn = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=300)
        started = False
        try:
            headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
            conn.request(self.command, self.path, body=body if self.command == "POST" else None, headers=headers)
            resp = conn.getresponse()
            started = True
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.getheader("Content-Type", "application/octet-stream"))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while chunk := resp.read1(65536):  # server-sent events go on as they come
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError as e:
            if not started:
                self._send(502, f"Triton did not answer: {e}\n".encode(), "text/plain")
            self.close_connection = True  # else the stream was cut: the browser sees it end early
        finally:
            conn.close()


def make_handler(triton_url: str) -> type[ReportPageHandler]:
    """The page's request handler class, passing /v2/... on to Triton at `triton_url`."""
    return type("Handler", (ReportPageHandler,), {"target": urlsplit(triton_url)})


def ui_server(host: str, port: int, triton_url: str) -> ThreadingHTTPServer:
    """The page's server, bound to host:port (OSError when the port is taken), not yet serving."""
    server = ThreadingHTTPServer((host, port), make_handler(triton_url))
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Serve in a daemon thread; server.shutdown() stops it."""
    t = threading.Thread(target=server.serve_forever, name="echo-ui", daemon=True)
    t.start()
    return t
