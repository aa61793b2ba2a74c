"""A STAND-IN for the OpenSandbox lifecycle server, for tests only.

This is not the OpenSandbox server and implements none of its logic. It answers just
the lifecycle calls that the real `opensandbox` Python SDK makes in `SandboxSync.connect`
/ `Sandbox.connect`, for one fixed sandbox, so that the SDK can be pointed at sandlet's
execd-compatible exec API without creating a sandbox anywhere.

What it serves (the SDK prefixes every lifecycle path with `/v1`):

* `GET /v1/sandboxes/{id}/endpoints/{port}` -> 200 `{"endpoint": "<host:port>", "headers": {...}}`.
  For the execd port (44772) the endpoint is `SANDLET_EXEC_ADDR` (host:port) and, when
  `SANDLET_EXEC_TOKEN` is set, `headers` is `{"X-EXECD-ACCESS-TOKEN": <token>}`; the SDK
  sends the endpoint's headers on every execd request. For any other port (the SDK also
  resolves the egress sidecar port, 18080, during connect, but never calls it unless
  egress features are used) the endpoint is the same host with that port.
* `GET /v1/sandboxes/{id}` -> 200, a minimal `Sandbox` object in state `Running`.
* Anything else, or another sandbox id -> 404 `{"code": ..., "message": ...}`.

A second id, `NO_TOKEN_SANDBOX_ID`, resolves to the same execd address but without the
token header, so a check can see that sandlet refuses requests without it.

Standard library only. Use in-process:

    port = lifecycle_stub.start()                 # free port on 127.0.0.1, daemon thread
    ConnectionConfigSync(domain=f"127.0.0.1:{port}", protocol="http")

or run it alone (`python3 lifecycle_stub.py [port]`) to serve in the foreground.
"""

import datetime
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SANDBOX_ID = "sandlet-sdk-check"
NO_TOKEN_SANDBOX_ID = "sandlet-sdk-check-no-token"
EXECD_PORT = 44772
TOKEN_HEADER = "X-EXECD-ACCESS-TOKEN"

# Every request the stub answered: dicts with method, path, query, headers (lower-cased names).
REQUESTS = []
_lock = threading.Lock()
_server = None

_ENDPOINT_RE = re.compile(r"^/v1/sandboxes/([^/]+)/endpoints/([0-9]+)$")
_SANDBOX_RE = re.compile(r"^/v1/sandboxes/([^/]+)$")


def _config(exec_addr, token):
    addr = exec_addr if exec_addr is not None else os.environ.get("SANDLET_EXEC_ADDR", "")
    if not addr:
        raise ValueError("lifecycle_stub: set SANDLET_EXEC_ADDR (host:port) or pass exec_addr")
    if "://" in addr or "/" in addr or ":" not in addr:
        raise ValueError(f"lifecycle_stub: exec address must be host:port, got {addr!r}")
    tok = token if token is not None else os.environ.get("SANDLET_EXEC_TOKEN", "")
    return addr, tok


def _make_handler(exec_addr, token):
    exec_host = exec_addr.rsplit(":", 1)[0]

    class Handler(BaseHTTPRequestHandler):
        server_version = "sandlet-lifecycle-stub"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet; REQUESTS keeps the record
            pass

        def _send_json(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _not_found(self, what):
            self._send_json(404, {"code": "SANDBOX_NOT_FOUND", "message": f"stub: {what}"})

        def _record(self):
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            with _lock:
                REQUESTS.append(
                    {
                        "method": self.command,
                        "path": url.path,
                        "query": parse_qs(url.query),
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                    }
                )
            return url

        def do_GET(self):
            url = self._record()
            m = _ENDPOINT_RE.match(url.path)
            if m:
                sid, port = m.group(1), int(m.group(2))
                if sid not in (SANDBOX_ID, NO_TOKEN_SANDBOX_ID):
                    return self._not_found(f"sandbox {sid} not found")
                if port == EXECD_PORT:
                    out = {"endpoint": exec_addr}
                    if token and sid == SANDBOX_ID:
                        out["headers"] = {TOKEN_HEADER: token}
                else:
                    out = {"endpoint": f"{exec_host}:{port}"}
                return self._send_json(200, out)
            m = _SANDBOX_RE.match(url.path)
            if m and m.group(1) in (SANDBOX_ID, NO_TOKEN_SANDBOX_ID):
                now = datetime.datetime.now(datetime.timezone.utc).isoformat()
                return self._send_json(
                    200,
                    {
                        "id": m.group(1),
                        "status": {"state": "Running"},
                        "entrypoint": ["sandlet"],
                        "createdAt": now,
                        "image": {"uri": "sandlet-stub"},
                        "metadata": {},
                    },
                )
            return self._not_found(f"no route for GET {url.path}")

        def _other(self):
            url = self._record()
            self._not_found(f"no route for {self.command} {url.path}")

        do_POST = do_DELETE = do_PATCH = do_PUT = _other

    return Handler


def start(exec_addr=None, token=None, host="127.0.0.1", port=0):
    """Start the stub in a daemon thread and return the port it listens on.

    exec_addr / token default to the env vars SANDLET_EXEC_ADDR / SANDLET_EXEC_TOKEN.
    """
    global _server
    if _server is not None:
        raise RuntimeError("lifecycle_stub already started")
    addr, tok = _config(exec_addr, token)
    _server = ThreadingHTTPServer((host, port), _make_handler(addr, tok))
    _server.daemon_threads = True
    threading.Thread(target=_server.serve_forever, name="lifecycle-stub", daemon=True).start()
    return _server.server_address[1]


def stop():
    """Stop a stub started with start()."""
    global _server
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None


def requests():
    """A copy of the requests answered so far."""
    with _lock:
        return list(REQUESTS)


if __name__ == "__main__":
    addr, tok = _config(None, None)
    p = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    srv = ThreadingHTTPServer(("127.0.0.1", p), _make_handler(addr, tok))
    print(f"lifecycle stub (stand-in) on 127.0.0.1:{srv.server_address[1]} -> execd {addr}", flush=True)
    srv.serve_forever()
