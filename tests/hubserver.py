"""A local stand-in for the Hugging Face Hub (127.0.0.1), enough for ``snapshot_download``.

The requests huggingface_hub makes (read from its source, ``_snapshot_download.py``,
``file_download.py``, ``hf_api.py``):

- ``GET /api/models/{repo}/revision/{rev}`` -> JSON with ``sha`` (the commit) and ``siblings``
  (``HfApi.repo_info``, skipped when the revision already is a 40-hex commit);
- ``GET /api/models/{repo}/tree/{commit}?recursive=...`` -> JSON list of files, each
  ``{"type": "file", "path", "size", "oid", "lfs": {"oid", "size", "pointerSize"}}``, paginated
  through a ``Link: <...>; rel="next"`` header (one page here) (``HfApi.list_repo_tree``);
- ``HEAD /{repo}/resolve/{commit}/{file}`` -> ``X-Repo-Commit``, ``ETag`` (git blob sha1, or the
  LFS sha256 that ``hf_hub_download`` checks the downloaded bytes against), ``Content-Length``; an
  LFS file answers ``302`` with ``Location`` and ``X-Linked-Etag`` / ``X-Linked-Size`` instead
  (``get_hf_file_metadata`` follows redirects only on the same host, so the LFS location
  here is ``localhost`` while the endpoint is ``127.0.0.1``);
- ``GET`` of the file (or of the ``Location``), whose length must equal the announced size.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth: set[str] = set()
        """Authorization headers seen (``HF_TOKEN``)."""
        self.truncate: set[str] = set()
        """Files whose GET sends half the announced bytes and hangs up (a failed download)."""
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        # LFS files redirect to another host name (the Hub's CDN), which HEAD does not follow
        self.cdn_url = f"http://localhost:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_folder(self, repo: str, folder: Path) -> None:
        self.repos[repo] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _is_lfs(name: str) -> bool:
        return name.endswith((".safetensors", ".bin", ".gguf"))

    @staticmethod
    def _etag(name: str, data: bytes) -> str:
        if FakeHub._is_lfs(name):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = h.path.split("?", 1)[0]
        self.requests.append((h.command, path))
        if not path.startswith("/lfs/"):  # the CDN host gets no token
            self.auth.add(h.headers.get("Authorization", ""))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._send(h, 404, b'{"error": "Repository not found"}', head)
            files = self.repos[repo]
            if parts[4] == "revision":
                body = {
                    "id": repo,
                    "sha": COMMIT,
                    "siblings": [{"rfilename": n} for n in sorted(files)],
                }
            else:  # tree
                body = [
                    {
                        "type": "file",
                        "path": n,
                        "size": len(d),
                        "oid": self._etag(n + ".git", d),
                        **(
                            {"lfs": {"oid": self._etag(n, d), "size": len(d), "pointerSize": 130}}
                            if self._is_lfs(n)
                            else {}
                        ),
                    }
                    for n, d in sorted(files.items())
                ]
            return self._send(h, 200, json.dumps(body).encode(), head, "application/json")
        if parts[0] == "lfs" and len(parts) == 4:  # /lfs/{org}/{name}/{file}
            repo, name = "/".join(parts[1:3]), parts[3]
            data = self.repos[repo][name]
            if not head and name in self.truncate:
                h.send_response(200)
                h.send_header("Content-Length", str(len(data)))
                h.end_headers()
                h.wfile.write(data[: len(data) // 2])
                h.wfile.flush()
                h.close_connection = True
                return None
            return self._send(h, 200, data, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            files = self.repos.get(repo)
            if files is None or name not in files:
                h.send_response(404)
                h.send_header("X-Error-Code", "EntryNotFound")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return None
            data = files[name]
            etag = self._etag(name, data)
            if self._is_lfs(name):
                h.send_response(302)
                h.send_header("Location", f"{self.cdn_url}/lfs/{repo}/{name}")
                h.send_header("X-Repo-Commit", COMMIT)
                h.send_header("X-Linked-Etag", f'"{etag}"')
                h.send_header("X-Linked-Size", str(len(data)))
                h.send_header("ETag", f'"{self._etag(name + ".git", data)}"')
                h.send_header("Content-Length", "0")
                h.end_headers()
                return None
            h.send_response(200)
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("ETag", f'"{etag}"')
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if not head:
                h.wfile.write(data)
            return None
        return self._send(h, 404, b"{}", head)

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler,
        code: int,
        body: bytes,
        head: bool,
        ctype: str = "application/octet-stream",
    ) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
