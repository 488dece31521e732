"""A small Hugging Face Hub on 127.0.0.1 for the upload tests.

It answers the HTTP endpoints that huggingface_hub's client calls on moeforge's upload path, and keeps
what it receives, so tests check real outcomes (the bytes in the repo, the LFS metadata it lists) rather
than which methods were called:

- whoami-v2, repos/create, models/<id>[/revision/<rev>], models/<id>/branch/<b>, validate-yaml;
- models/<id>/tree/<rev>[/<path>] (paginated with a Link header) and models/<id>/paths-info/<rev>,
  listing each file's git blob id and, for LFS files, their sha256, size and pointer size;
- models/<id>/preupload/<rev> (upload mode from .gitattributes and size), the git LFS batch API
  (`basic` transfer only: Xet is never offered), the object PUT and verify;
- models/<id>/commit/<rev> (the ndjson payload: header, file, lfsFile, deletedFile).

The server checks what the Hub checks: the bearer token (401), write access to the namespace (403),
repos and revisions that exist (404), LFS objects uploaded before a commit names them with the right
size and sha256, files committed in the upload mode preupload gave them. Requests it does not know are
answered 404 and recorded in `unexpected`. Bounded: request bodies, chunked uploads and the socket timeout.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import http.server
import json
import re
import threading
from typing import Dict, List, Optional
from urllib.parse import parse_qs, unquote, urlsplit

USER = "me"
MAX_BODY = 512 * 1024 * 1024
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores larger files in LFS whatever .gitattributes says
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.model", "*.onnx",
                    "*.msgpack", "*.npy", "*.npz", "*.zip", "*.tar.*", "*tfevents*")
).encode()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class StoredFile:
    def __init__(self, data: bytes, lfs: bool):
        self.data, self.lfs = data, lfs

    def entry(self, path: str) -> dict:
        """The tree / paths-info entry the Hub gives for this file."""
        if not self.lfs:
            return {"type": "file", "path": path, "size": len(self.data), "oid": git_blob_id(self.data)}
        sha = hashlib.sha256(self.data).hexdigest()
        pointer = lfs_pointer(sha, len(self.data))
        return {"type": "file", "path": path, "size": len(self.data), "oid": git_blob_id(pointer),
                "lfs": {"oid": sha, "size": len(self.data), "pointerSize": len(pointer)}}


class Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id, self.private = repo_id, private
        self.branches: Dict[str, Dict[str, StoredFile]] = {}
        self.heads: Dict[str, str] = {}
        self.commits: List[dict] = []

    def commit(self, branch: str, files: Dict[str, StoredFile], summary: str, ops: list) -> str:
        oid = hashlib.sha1(f"{self.repo_id}:{len(self.commits)}:{summary}".encode()).hexdigest()
        self.branches[branch], self.heads[branch] = files, oid
        self.commits.append({"branch": branch, "summary": summary, "oid": oid, "ops": ops})
        return oid

    def is_lfs(self, branch: str, path: str, size: int) -> bool:
        attributes = self.branches.get(branch, {}).get(".gitattributes")
        patterns = [line.split()[0] for line in (attributes.data.decode() if attributes else "").splitlines()
                    if "filter=lfs" in line]
        name = path.rsplit("/", 1)[-1]
        return size >= LFS_THRESHOLD or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Failure:
    """Answer the next `times` matching requests with `status` (or drop the connection: status None)."""

    def __init__(self, method: str, path: str, status: Optional[int], message: str, times: int, body: str,
                 code: Optional[str]):
        self.method, self.path, self.status, self.message, self.times, self.body, self.code = (
            method, re.compile(path), status, message, times, body, code)


class LocalHub:
    """State and failure injection; `url` is the endpoint to point huggingface_hub at."""

    def __init__(self, page_size: int = 4):
        self.repos: Dict[str, Repo] = {}
        self.lfs: Dict[str, bytes] = {}  # sha256 -> bytes (the LFS object store)
        self.requests: List[tuple] = []  # (method, path, token)
        self.unexpected: List[str] = []
        self.rejected_tokens = set()
        self.failures: List[Failure] = []
        self.page_size = page_size
        self.lock = threading.RLock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="local-hub", daemon=True)

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # ---- what tests set up and inspect ---------------------------------------------------------
    def add_repo(self, repo_id: str, private: bool = False, files: Optional[Dict[str, bytes]] = None) -> Repo:
        with self.lock:
            repo = self.repos[repo_id] = Repo(repo_id, private)
            stored = {".gitattributes": StoredFile(GITATTRIBUTES, False)}
            repo.commit("main", stored, "initial commit", [".gitattributes"])
            for path, data in (files or {}).items():
                stored[path] = StoredFile(data, repo.is_lfs("main", path, len(data)))
                if stored[path].lfs:
                    self.lfs[hashlib.sha256(data).hexdigest()] = data
            return repo

    def files(self, repo_id: str, branch: str = "main") -> Dict[str, bytes]:
        with self.lock:
            return {p: f.data for p, f in self.repos[repo_id].branches[branch].items()}

    def stored(self, repo_id: str, branch: str = "main") -> Dict[str, StoredFile]:
        with self.lock:
            return dict(self.repos[repo_id].branches[branch])

    def commits(self, repo_id: str) -> List[dict]:
        """Commits after the repo's initial one."""
        return self.repos[repo_id].commits[1:]

    def fail(self, method: str, path: str, status: Optional[int], message: str = "Internal Error", times: int = 1,
             body: str = "", code: Optional[str] = None) -> None:
        """`path`: a regex searched in the request path; `body`: text the request body must contain;
        `code`: the X-Error-Code header (RepoNotFound, RevisionNotFound, ...)."""
        self.failures.append(Failure(method, path, status, message, times, body, code))

    def tokens(self) -> set:
        """The tokens sent on requests that need one."""
        return {t for m, p, t in self.requests if not p.startswith("/__lfs/") and p != "/api/agent-harnesses"}

    def sent(self, method: str, pattern: str) -> List[str]:
        return [p for m, p, _ in self.requests if m == method and re.search(pattern, p)]

    # ---- request handling ------------------------------------------------------------------------
    def failure_for(self, method: str, path: str, body: bytes) -> Optional[Failure]:
        with self.lock:
            for f in self.failures:
                if f.times > 0 and f.method == method and f.path.search(path) and f.body.encode() in body:
                    f.times -= 1
                    return f
        return None

    def authorize(self, token: Optional[str]) -> None:
        if not token or token in self.rejected_tokens:
            raise HubError(401, "Invalid credentials in Authorization header")

    def route(self, method: str, path: str, query: dict, body: bytes, token: Optional[str]):
        """(status, JSON-able body or bytes, extra headers)."""
        if method == "PUT" and path.startswith("/__lfs/"):  # a presigned storage URL: no token
            return self.lfs_put(path[len("/__lfs/"):], body)
        if method == "GET" and path == "/api/agent-harnesses":  # fetched by the client for its user agent
            return 200, {"standardEnvVars": [], "harnesses": {}}, {}
        self.authorize(token)
        m = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/(?P<op>batch|verify)", path)
        if m and method == "POST":
            repo = self.repo(m["repo"], write=True)
            return self.lfs_batch(repo, json.loads(body)) if m["op"] == "batch" else self.lfs_verify(json.loads(body))
        if path == "/api/whoami-v2" and method == "GET":
            return 200, {"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token",
                                                                          "accessToken": {"role": "write"}}}, {}
        if path == "/api/repos/create" and method == "POST":
            return self.create_repo(json.loads(body))
        if path == "/api/validate-yaml" and method == "POST":
            return 200, {"errors": [], "warnings": []}, {}
        m = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>[a-z-]+)(?:/(?P<rest>.*))?)?", path)
        if not m:
            raise HubError(404, f"no route for {method} {path}", "Unexpected")
        op, rest = m["op"], unquote(m["rest"] or "")
        if op is None and method == "GET":
            return self.repo_info(self.repo(m["repo"]), None)
        if op == "revision" and method == "GET":
            return self.repo_info(self.repo(m["repo"]), rest)
        if op == "branch" and method == "POST":
            return self.create_branch(self.repo(m["repo"], write=True), rest, json.loads(body or b"{}"))
        if op == "tree" and method == "GET":
            return self.tree(self.repo(m["repo"]), m["rest"] or "", query)
        if op == "paths-info" and method == "POST":
            return self.paths_info(self.repo(m["repo"]), rest, parse_qs(body.decode()))
        if op == "preupload" and method == "POST":
            return self.preupload(self.repo(m["repo"], write=True), rest, json.loads(body))
        if op == "commit" and method == "POST":
            return self.commit(self.repo(m["repo"], write=True), rest, body)
        raise HubError(404, f"no route for {method} {path}", "Unexpected")

    def repo(self, repo_id: str, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and repo_id.split("/")[0] != USER:
            raise HubError(403, "You don't have the rights to write to this repository")
        return repo

    def branch(self, repo: Repo, rev: str) -> Dict[str, StoredFile]:
        rev = unquote(rev)
        files = repo.branches.get(rev)
        if files is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return files

    def create_repo(self, payload: dict):
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
        if repo_id.split("/")[0] != USER:
            raise HubError(403, "You don't have the rights to create a model under this namespace")
        self.add_repo(repo_id, private=payload.get("visibility") == "private" or payload.get("private") is True)
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def repo_info(self, repo: Repo, rev: Optional[str]):
        files = self.branch(repo, rev or "main")
        return 200, {"id": repo.repo_id, "_id": repo.repo_id, "author": repo.repo_id.split("/")[0],
                     "private": repo.private, "sha": repo.heads[unquote(rev or "main")], "tags": [],
                     "siblings": [{"rfilename": p} for p in sorted(files)]}, {}

    def create_branch(self, repo: Repo, name: str, payload: dict):
        if name in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{name}")
        repo.branches[name] = dict(self.branch(repo, payload.get("startingPoint") or "main"))
        repo.heads[name] = repo.heads["main"]
        return 200, {}, {}

    def tree(self, repo: Repo, rest: str, query: dict):
        rev, _, prefix = rest.partition("/")
        files = self.branch(repo, rev)
        prefix = unquote(prefix).strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = {}
        for path, f in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            parts = (path[len(prefix) + 1:] if prefix else path).split("/")
            if recursive or len(parts) == 1:
                entries[path] = f.entry(path)
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_id(folder.encode())})
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
        ordered = [entries[k] for k in sorted(entries)]
        start = int(query.get("cursor", ["0"])[0])
        page = ordered[start:start + self.page_size]
        headers = {}
        if start + self.page_size < len(ordered):
            headers["Link"] = f'<{self.url}/api/models/{repo.repo_id}/tree/{rest}?recursive={str(recursive).lower()}' \
                              f'&cursor={start + self.page_size}>; rel="next"'
        return 200, page, headers

    def paths_info(self, repo: Repo, rev: str, form: dict):
        files = self.branch(repo, rev)
        return 200, [files[p].entry(p) for p in form.get("paths", []) if p in files], {}

    def preupload(self, repo: Repo, rev: str, payload: dict):
        files = self.branch(repo, rev)
        out = []
        for item in payload["files"]:
            path, size = item["path"], int(item["size"])
            lfs = repo.is_lfs(rev, path, size)
            remote = files.get(path)
            oid = None
            if remote is not None:
                oid = hashlib.sha256(remote.data).hexdigest() if remote.lfs else git_blob_id(remote.data)
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return 200, {"files": out, "commitOid": repo.heads[unquote(rev)]}, {}

    def lfs_batch(self, repo: Repo, payload: dict):
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "only the basic upload transfer is offered")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            if oid in self.lfs and len(self.lfs[oid]) == size:
                objects.append({"oid": oid, "size": size})
                continue
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{self.url}/__lfs/{oid}"},
                "verify": {"href": f"{self.url}/{repo.repo_id}.git/info/lfs/objects/verify"},
            }})
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def lfs_put(self, oid: str, body: bytes):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded bytes do not match their sha256")
        self.lfs[oid] = body
        return 200, b"", {"ETag": '"%s"' % hashlib.md5(body).hexdigest()}

    def lfs_verify(self, payload: dict):
        data = self.lfs.get(payload["oid"])
        if data is None or len(data) != int(payload["size"]):
            raise HubError(404, "LFS object not found")
        return 200, {}, {}

    def commit(self, repo: Repo, rev: str, body: bytes):
        rev = unquote(rev)
        files = dict(self.branch(repo, rev))
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload starts with a header")
        summary, ops = lines[0]["value"]["summary"], []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                data = base64.b64decode(value["content"])
                if repo.is_lfs(rev, path, len(data)):
                    raise HubError(400, f"{path}: this file must be uploaded with LFS")
                files[path] = StoredFile(data, False)
            elif key == "lfsFile":
                data = self.lfs.get(value["oid"])
                if data is None or len(data) != int(value.get("size", len(data or b""))):
                    raise HubError(400, f"{path}: LFS object {value['oid']} was never uploaded")
                files[path] = StoredFile(data, True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            else:
                raise HubError(400, f"unknown commit operation {key}")
            ops.append((key, path))
        oid = repo.commit(rev, files, summary, ops)
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}",
                     "pullRequestUrl": None}, {}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: LocalHub


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # a stalled client cannot hold a thread forever

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def _serve(self, method: str) -> None:
        hub: LocalHub = self.server.hub
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        try:
            body = self._body()
        except ValueError as e:
            return self._reply(400, {"error": str(e)}, {})
        with hub.lock:
            hub.requests.append((method, path, token))
        failure = hub.failure_for(method, path, body)
        if failure is not None:
            if failure.status is None:  # the connection drops: no answer at all
                self.close_connection = True
                self.connection.shutdown(2)
                return
            headers = {"X-Error-Message": failure.message, **({"X-Error-Code": failure.code} if failure.code else {})}
            return self._reply(failure.status, {"error": failure.message}, headers)
        try:
            with hub.lock:
                status, payload, headers = hub.route(method, path, query, body, token)
        except HubError as e:
            if e.code == "Unexpected":
                with hub.lock:
                    hub.unexpected.append(f"{method} {self.path}")
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
            return self._reply(e.status, {"error": e.message}, headers)
        self._reply(status, payload, headers)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            for _ in range(1_000_000):  # bounded: a chunk per iteration
                size = int(self.rfile.readline(64).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024).strip():  # trailers
                        pass
                    return bytes(data)
                if len(data) + size > MAX_BODY:
                    raise ValueError("request body too large")
                data += self.rfile.read(size)
                self.rfile.readline(8)
            raise ValueError("too many chunks")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("request body too large")
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, payload, headers: dict) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
