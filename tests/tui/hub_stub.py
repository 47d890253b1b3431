"""A local imitation of the Hugging Face hub, enough for huggingface_hub's snapshot_download and login.

It serves folders (the tiny model) as repos on 127.0.0.1 with the endpoints
and headers huggingface_hub 2.x reads (checked against its source):

  GET  /api/models/{repo}[/revision/{rev}]     model info: id, sha, siblings
  GET  /api/models/{repo}/tree/{rev}[/{path}]  file listing (type, path, size, oid, lfs)
  GET  /api/models/{repo}/auth-check           200, or 403 GatedRepo / 404 RepoNotFound
  GET  /api/whoami-v2                          the token's user (huggingface_hub.login checks it)
  HEAD/GET /{repo}/resolve/{rev}/{path}        ETag, X-Repo-Commit, Content-Length; Range for resuming;
                                               LFS files (*.safetensors) redirect to /cdn/ with
                                               X-Linked-Etag and X-Linked-Size, as the real hub does
  GET  /cdn/{repo}/{path}                      the LFS bytes

A gated repo answers 403 with `X-Error-Code: GatedRepo` to file and auth-check
requests unless the request carries an accepted token; an unknown repo answers
404 with `X-Error-Code: RepoNotFound`. `cut_after_bytes` drops the connection
mid-file once per file, to test that a second attempt resumes.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

STUB_USER = "stub-user"


@dataclass
class StubRepo:
    folder: Path
    gated: bool = False
    sha: str = "0123456789abcdef0123456789abcdef01234567"

    def files(self) -> dict[str, Path]:
        return {path.relative_to(self.folder).as_posix(): path
                for path in sorted(self.folder.rglob("*")) if path.is_file()}


def is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubStub:
    """`with HubStub({"owner/name": StubRepo(folder)}) as hub:` then point huggingface_hub at hub.endpoint."""

    repos: dict[str, StubRepo]
    accepted_tokens: set[str] = field(default_factory=set)
    cut_after_bytes: int | None = None
    requests: list[tuple[str, str]] = field(default_factory=list)
    range_requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header)

    def __post_init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._cut_done: set[str] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_endpoint(self) -> str:
        # another host name for the same server: huggingface_hub follows redirects only within the hub's
        # host, and reads the LFS file's metadata from the redirect itself, as with the real CDN
        return f"http://localhost:{self._server.server_address[1]}"

    def start(self) -> "HubStub":
        hub = self

        class Handler(_Handler):
            stub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubStub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def should_cut(self, path: str) -> bool:
        with self._lock:
            if self.cut_after_bytes is None or path in self._cut_done:
                return False
            self._cut_done.add(path)
            return True


class _Handler(BaseHTTPRequestHandler):
    stub: HubStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    # -- routing ----------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.stub.requests.append((self.command, path))
        parts = [part for part in path.split("/") if part]
        if parts[:2] == ["api", "whoami-v2"]:
            return self._whoami()
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            repo = self._repo_or_404(repo_id)
            if repo is None:
                return
            if not rest or rest[0] == "revision":
                return self._model_info(repo_id, repo)
            if rest[0] == "tree":
                return self._tree(repo, "/".join(rest[2:]))
            if rest[0] == "auth-check":
                if self._gated_refused(repo):
                    return
                return self._json({})
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = "/".join(parts[:2])
            repo = self._repo_or_404(repo_id)
            if repo is None or self._gated_refused(repo):
                return
            return self._resolve(repo_id, repo, "/".join(parts[4:]), head)
        if parts[:1] == ["cdn"] and len(parts) >= 4:
            repo = self.stub.repos.get("/".join(parts[1:3]))
            if repo is None:
                return self._error(404, "EntryNotFound", "no such file")
            return self._send_file(repo, "/".join(parts[3:]), head)
        self._error(404, "EntryNotFound", f"no route for {path}")

    # -- answers ----------------------------------------------------------------------------------

    def _token(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return header[len("Bearer "):] if header.startswith("Bearer ") else None

    def _repo_or_404(self, repo_id: str) -> StubRepo | None:
        repo = self.stub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
        return repo

    def _gated_refused(self, repo: StubRepo) -> bool:
        if repo.gated and self._token() not in self.stub.accepted_tokens:
            self._error(403, "GatedRepo", "Access to this model is restricted. You must have access to it "
                                          "and be authenticated to access it. Please log in.")
            return True
        return False

    def _whoami(self) -> None:
        token = self._token()
        if token not in self.stub.accepted_tokens:
            return self._error(401, None, "Invalid credentials in Authorization header")
        self._json({"type": "user", "name": STUB_USER,
                    "auth": {"type": "access_token", "accessToken": {"displayName": "stub-token", "role": "read"}}})

    def _model_info(self, repo_id: str, repo: StubRepo) -> None:
        self._json({"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                    "gated": "manual" if repo.gated else False,
                    "siblings": [{"rfilename": name} for name in repo.files()]})

    def _tree(self, repo: StubRepo, under: str) -> None:
        entries, folders = [], set()
        for name, path in repo.files().items():
            if under and not name.startswith(under.rstrip("/") + "/"):
                continue
            data = path.read_bytes()
            entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
            if is_lfs(name):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
            parent = Path(name).parent
            while str(parent) not in (".", ""):
                folders.add(parent.as_posix())
                parent = parent.parent
        entries += [{"type": "directory", "path": folder, "oid": "0" * 40, "size": 0} for folder in sorted(folders)]
        self._json(entries)

    def _resolve(self, repo_id: str, repo: StubRepo, name: str, head: bool) -> None:
        path = repo.files().get(name)
        if path is None:
            return self._error(404, "EntryNotFound", f"Entry Not Found for url: {self.path}.")
        data = path.read_bytes()
        headers = {"X-Repo-Commit": repo.sha}
        if is_lfs(name):
            headers.update({"Location": f"{self.stub.cdn_endpoint}/cdn/{repo_id}/{name}",
                            "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                            "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_id(data)}"',
                            "Content-Length": "0"})
            self._head_only(302, headers)
            return
        self._send_file(repo, name, head, extra=headers)

    def _send_file(self, repo: StubRepo, name: str, head: bool, extra: dict | None = None) -> None:
        path = repo.files().get(name)
        if path is None:
            return self._error(404, "EntryNotFound", "no such file")
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if is_lfs(name) else git_blob_id(data)
        start = 0
        range_header = self.headers.get("Range", "")
        if range_header.startswith("bytes=") and not head:
            self.stub.range_requests.append((name, range_header))
            start = int(range_header[len("bytes="):].split("-")[0] or 0)
        body = data[start:]
        self.send_response(206 if start else 200)
        for key, value in {**(extra or {}), "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream", "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        cut = self.stub.cut_after_bytes
        if cut is not None and len(body) > cut and self.stub.should_cut(f"{repo.folder}/{name}"):
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _json(self, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _head_only(self, status: int, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _error(self, status: int, code: str | None, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def point_huggingface_hub_at(monkeypatch, endpoint: str, hf_home: Path) -> None:
    """Send huggingface_hub to `endpoint` with a fresh cache and no token, for this test only.

    HF_ENDPOINT is read once at import, so the derived constants are patched
    too, and the module-level HfApi behind `whoami` (used by `login`).
    """
    from huggingface_hub import constants, hf_api

    hf_home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
