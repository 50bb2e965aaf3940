#!/usr/bin/env python3
"""An HTTP/1.1 origin for the proxy and health tests (standard library only).

    http_origin.py [PORT]      (0 or nothing: an ephemeral port)

Prints `listening 127.0.0.1:PORT` first, then one JSON object a line for each event a test
may wait for. Routes (any method unless said):

  /headers[?ms=N] JSON: method, raw request target, the headers as they arrived (in order),
                  the client port of the connection, and the body length read (after N ms)
  POST /sha256    reads the whole body (Content-Length or chunked), answers its SHA-256
  POST /early     answers 200 (chunked) at once, before reading the body; then reads it all,
                  printing {"event":"progress","bytes":N} after each MiB, and ends the answer
                  with the body's length and SHA-256 (also printed as an "early-done" event)
  /sleep?ms=N     sleeps N ms before answering (HEAD too); also /sleep/N
  /drip?n=N&ms=M  N chunks, one each M ms
  /hop            a response carrying hop-by-hop headers and X-Powered-By
"""

import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MIB = 1 << 20
PRINT_LOCK = threading.Lock()


def event(**fields):
    with PRINT_LOCK:
        print(json.dumps(fields), flush=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "py-origin"

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass

    # -- request bodies --------------------------------------------------------------------

    def body_chunks(self):
        """The request body, piece by piece, whatever its framing."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise EOFError("connection closed inside a chunked body")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                while size:
                    data = self.rfile.read(min(size, 1 << 16))
                    if not data:
                        raise EOFError("connection closed inside a chunk")
                    size -= len(data)
                    yield data
                self.rfile.readline(3)
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, 1 << 16))
                if not data:
                    raise EOFError("connection closed inside the body")
                left -= len(data)
                yield data

    def read_body(self, on_progress=None):
        digest = hashlib.sha256()
        total = 0
        next_mark = MIB
        for data in self.body_chunks():
            digest.update(data)
            total += len(data)
            if on_progress and total >= next_mark:
                on_progress(total)
                next_mark = (total // MIB + 1) * MIB
        return total, digest.hexdigest()

    # -- responses -------------------------------------------------------------------------

    def reply(self, status, body, content_type="text/plain", headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def start_chunked(self, status=200, content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data):
        if isinstance(data, str):
            data = data.encode()
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- routes ----------------------------------------------------------------------------

    def handle_any(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        route = url.path
        if route == "/headers":
            length, _ = self.read_body()
            time.sleep(int(query.get("ms", "0")) / 1000)
            self.reply(
                200,
                json.dumps(
                    {
                        "method": self.command,
                        "target": self.path,
                        "version": self.request_version,
                        "headers": [[k, v] for k, v in self.headers.items()],
                        "client_port": self.client_address[1],
                        "body_len": length,
                    }
                ),
                "application/json",
            )
        elif route == "/sha256":
            length, digest = self.read_body()
            self.reply(200, json.dumps({"bytes": length, "sha256": digest}), "application/json")
        elif route == "/early":
            self.start_chunked(200, "application/json")
            self.chunk('{"early":true}\n')
            length, digest = self.read_body(lambda n: event(event="progress", bytes=n))
            event(event="early-done", bytes=length, sha256=digest)
            self.chunk(json.dumps({"bytes": length, "sha256": digest}) + "\n")
            self.chunk(b"")
        elif route == "/sleep" or route.startswith("/sleep/"):
            self.read_body()
            ms = int(route[len("/sleep/"):] if route.startswith("/sleep/") else query.get("ms", "1000"))
            time.sleep(ms / 1000)
            self.reply(200, f"slept {ms} ms\n")
        elif route == "/drip":
            self.read_body()
            n, ms = int(query.get("n", "3")), int(query.get("ms", "500"))
            self.start_chunked()
            for i in range(n):
                if i:
                    time.sleep(ms / 1000)
                self.chunk(f"drip {i}\n")
            self.chunk(b"")
        elif route == "/hop":
            self.read_body()
            self.reply(
                200,
                "hop\n",
                headers=(
                    ("Connection", "X-Hop-Resp"),
                    ("X-Hop-Resp", "must not pass"),
                    ("Keep-Alive", "timeout=9"),
                    ("X-Powered-By", "Python"),
                    ("X-End-To-End", "kept"),
                ),
            )
        else:
            self.read_body()
            self.reply(404, "no such route\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = handle_any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        event(event="error", error=repr(sys.exc_info()[1]))


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = Server(("127.0.0.1", port), Handler)
    print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
