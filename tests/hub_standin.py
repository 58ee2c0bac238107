"""A standard-library stand-in for the Hugging Face Hub, for offline tests of `push`.

The real `huggingface_hub` client (2.4.0) talks HTTP to it when `HF_ENDPOINT` points at `hub.url`.
Also set `HF_HUB_DISABLE_XET=1` (large files then go through the legacy LFS protocol) and leave
`HF_HUB_OFFLINE` unset: the client reads all three when it is *imported*, so set them in the
environment of a subprocess (tests/conftest.py sets HF_HUB_OFFLINE=1 for the test process).

    with HubStandin(tmp_path, {"tok-a": {"name": "alice", "orgs": ["acme"], "write": True}}) as hub:
        ...  # run the client with HF_ENDPOINT=hub.url, HF_TOKEN=tok-a
        assert hub.files("alice/m")["README.md"] == b"..."

Model repos only. Routes (anything else is answered 404 and appended to `hub.unhandled`):
  GET  /api/whoami-v2, /api/agent-harnesses       POST /api/repos/create, /api/validate-yaml
  DELETE /api/repos/delete                        GET  /api/models/{repo}[/revision/{rev}]
  GET  /api/models/{repo}/tree/{rev}[/{path}]     GET  /api/models/{repo}/refs, .../commits/{rev}
  POST /api/models/{repo}/preupload/{rev}         POST /api/models/{repo}/commit/{rev}[?create_pr=1]
  POST|DELETE /api/models/{repo}/branch/{name}    GET|HEAD /{repo}/resolve/{rev}/{path}  (Range too)
  POST /{repo}.git/info/lfs/objects/batch|verify  PUT  /lfs-upload/{oid}  (the "presigned" URL, no auth)
A new repo starts with an empty "initial commit" (the real Hub's also holds a `.gitattributes`, left
out here so that `hub.files()` is exactly what was pushed); a file is "lfs" when its size >= lfs_threshold.
Blobs are stored under `root`, the rest lives in memory.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class _Reply(Exception):
    """Raised by route handlers to answer with an error status (JSON body, Hub-style headers)."""

    def __init__(self, status: int, error: str, headers: dict | None = None, code: str | None = None, **extra):
        super().__init__(status)
        self.status, self.payload = status, {"error": error, **extra}
        self.headers = {"X-Error-Message": error, **(headers or {}), **({"X-Error-Code": code} if code else {})}


class HubStandin:
    def __init__(self, root: Path, tokens: dict[str, dict], lfs_threshold: int = 1 << 20):
        self.root, self.tokens, self.lfs_threshold = Path(root), tokens, lfs_threshold
        self.url: str | None = None
        self.repos: dict[str, dict] = {}  # repo_id -> {"id", "owner", "private", "type", "branches": {name: oid}}
        self.requests: list[dict] = []  # every request: {"method", "path", "headers", "body"}
        self.unhandled: list[dict] = []  # unknown routes, and tracebacks of stand-in bugs
        self._log: dict[str, dict] = {}  # commit oid -> {"oid", "repo", "parent", "summary", "tree", ...}
        self._lfs: dict[str, int] = {}  # uploaded LFS oid -> size
        self._pending: dict[str, int] = {}  # oid announced by the batch API -> expected size
        self._failures: list[list] = []  # [path_substring, remaining, status]
        self._lock = threading.RLock()
        self._conns: set = set()
        self._server: ThreadingHTTPServer | None = None
        (self.root / "objects").mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> HubStandin:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("_Bound", (_Handler,), {"hub": self}))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True, name="hub-standin").start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for sock in list(self._conns):  # also end idle keep-alive connections
                try:
                    sock.shutdown(2)
                except OSError:
                    pass
        self._server = None

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ test helpers
    def add_repo(self, repo_id: str, owner: str | None = None, private: bool = False, repo_type: str = "model") -> dict:
        with self._lock:
            repo = {"id": repo_id, "owner": owner or repo_id.split("/")[0], "private": bool(private),
                    "type": repo_type, "branches": {}, "created": _now()}
            self.repos[repo_id] = repo
            repo["branches"]["main"] = self._new_commit(repo_id, None, "initial commit", "", {}, [], "system")
            return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            tree = self._log[self._resolve(repo_id, revision)]["tree"]
        return {path: (self.root / "objects" / e["key"]).read_bytes() for path, e in sorted(tree.items())}

    def commits(self, repo_id: str, revision: str = "main") -> list[dict]:
        out = []
        with self._lock:
            oid = self._resolve(repo_id, revision)
            while oid is not None:
                out.append({k: self._log[oid][k] for k in ("oid", "summary", "description", "paths")})
                oid = self._log[oid]["parent"]
        return out[::-1]

    def fail_next(self, path_substring: str, times: int = 1, status: int = 500) -> None:
        """The next `times` requests whose path contains the substring get `status` (0: connection dropped)."""
        with self._lock:
            self._failures.append([path_substring, times, status])

    # ------------------------------------------------------- storage and auth
    def _store(self, data: bytes, key: str | None = None) -> str:
        key = key or _git_sha1(data)  # regular files: git blob sha1; LFS files: sha256
        target = self.root / "objects" / key
        if not target.exists():
            tmp = target.with_name(key + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return key

    def _new_commit(self, repo_id, parent, summary, description, tree, paths, author) -> str:
        seed = json.dumps([repo_id, parent, summary, description, sorted(tree), len(self._log), time.time()])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        self._log[oid] = {"oid": oid, "repo": repo_id, "parent": parent, "summary": summary, "paths": paths,
                          "description": description, "tree": tree, "author": author, "date": _now()}
        return oid

    def _resolve(self, repo_id: str, rev: str) -> str:
        if rev in self.repos[repo_id]["branches"]:
            return self.repos[repo_id]["branches"][rev]
        if self._log.get(rev, {}).get("repo") == repo_id:
            return rev
        raise _Reply(404, f"Invalid rev id: {rev}", code="RevisionNotFound")

    @staticmethod
    def _entry_json(path: str, e: dict) -> dict:
        out = {"type": "file", "path": path, "size": e["size"], "oid": e["key"]}
        if e["lfs"]:
            pointer = _lfs_pointer(e["key"], e["size"])
            out.update(oid=_git_sha1(pointer), lfs={"oid": e["key"], "size": e["size"], "pointerSize": len(pointer)})
        return out

    def _user(self, headers, required: bool = False) -> dict | None:
        auth = headers.get("Authorization")
        if auth is None and not required:
            return None
        token = auth[len("Bearer "):].strip() if auth and auth.startswith("Bearer ") else None
        if token not in self.tokens:
            raise _Reply(401, INVALID_CREDENTIALS)
        return self.tokens[token]

    @staticmethod
    def _member(user: dict | None, namespace: str) -> bool:
        return user is not None and (namespace == user["name"] or namespace in user.get("orgs", []))

    def _repo(self, repo_id: str, user: dict | None, write: bool = False) -> dict:
        repo = self.repos.get(repo_id)
        if repo is None or (repo["private"] and not self._member(user, repo["owner"])):
            raise _Reply(401 if user is None else 404, "Repository not found", code="RepoNotFound")
        if write and user is None:
            raise _Reply(401, INVALID_CREDENTIALS)
        if write and not (user.get("write") and self._member(user, repo["owner"])):
            raise _Reply(403, f"You don't have the rights to write to the model {repo_id}")
        return repo

    # ----------------------------------------------------------------- routing
    def _route(self, method: str, path: str, query: dict, headers, body: bytes):
        seg = [unquote(s) for s in path.strip("/").split("/")]
        if path == "/api/whoami-v2" and method == "GET":
            user = self._user(headers, required=True)
            role = "write" if user.get("write") else "read"
            orgs = [{"type": "org", "name": o, "id": f"id-{o}", "roleInOrg": role} for o in user.get("orgs", [])]
            return 200, {"type": "user", "id": f"id-{user['name']}", "name": user["name"], "fullname": user["name"],
                         "isPro": False, "emailVerified": True, "orgs": orgs,
                         "auth": {"type": "access_token", "accessToken": {
                             "displayName": user.get("token_name", "standin"), "role": role, "createdAt": _now()}}}, {}
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(self._user(headers, required=True), json.loads(body or b"{}"))
        if path == "/api/repos/delete" and method == "DELETE":
            data, user = json.loads(body or b"{}"), self._user(headers, required=True)
            repo_id = f"{data.get('organization') or user['name']}/{data['name']}"
            self._repo(repo_id, user, write=True)
            del self.repos[repo_id]
            return 200, {}, {}
        if path == "/api/validate-yaml" and method == "POST":
            return 200, {"errors": [], "warnings": []}, {}
        if path == "/api/agent-harnesses" and method == "GET":  # fetched for the User-Agent unless telemetry is off
            return 200, {"standardEnvVars": [], "harnesses": {}}, {}
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            return self._api_repo(method, f"{seg[2]}/{seg[3]}", seg[4:], query, headers, body)
        if seg[0] == "lfs-upload" and len(seg) == 2 and method == "PUT":
            return self._lfs_put(seg[1], body)
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"] and method == "POST":
            return self._lfs_api(f"{seg[0]}/{seg[1][:-4]}", seg[5], headers, json.loads(body or b"{}"))
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), headers)
        return None

    def _create_repo(self, user: dict, data: dict):
        ns = data.get("organization") or user["name"]
        if (data.get("type") or "model") != "model":
            raise _Reply(400, "HubStandin only supports model repos")
        if not (user.get("write") and self._member(user, ns)):
            raise _Reply(403, f'You don\'t have the rights to create a model under the namespace "{ns}"')
        repo_id = f"{ns}/{data['name']}"
        if repo_id in self.repos:  # huggingface_hub reads "url" from the 409 body when exist_ok=True
            raise _Reply(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        self.add_repo(repo_id, owner=ns, private=bool(data.get("private")) or data.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": f"id-{repo_id}"}, {}

    def _api_repo(self, method, repo_id, rest, query, headers, body):
        user = self._user(headers)
        action, args = (rest[0], rest[1:]) if rest else ("", [])
        if method == "GET" and (action == "" or (action == "revision" and len(args) == 1)):
            repo = self._repo(repo_id, user)
            oid = self._resolve(repo_id, args[0] if args else "main")
            siblings = []
            for p, e in sorted(self._log[oid]["tree"].items()):
                info = self._entry_json(p, e)
                sib = {"rfilename": p, "size": e["size"], "blobId": info["oid"]}
                if e["lfs"]:
                    sib["lfs"] = {"size": e["size"], "sha256": e["key"], "pointerSize": info["lfs"]["pointerSize"]}
                siblings.append(sib)
            return 200, {"_id": f"id-{repo_id}", "id": repo_id, "modelId": repo_id, "author": repo["owner"], "sha": oid,
                         "private": repo["private"], "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                         "tags": [], "siblings": siblings, "createdAt": repo["created"],
                         "lastModified": self._log[oid]["date"]}, {}
        if method == "GET" and action == "tree" and args:
            self._repo(repo_id, user)
            tree = self._log[self._resolve(repo_id, args[0])]["tree"]
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return 200, self._tree(tree, "/".join(args[1:]), recursive), {}
        if method == "GET" and action == "refs":
            branches = self._repo(repo_id, user)["branches"]
            refs = [{"name": b, "ref": b if b.startswith("refs/") else f"refs/heads/{b}", "targetCommit": o}
                    for b, o in sorted(branches.items())]
            return 200, {"branches": [r for r in refs if not r["name"].startswith("refs/")], "converts": [], "tags": [],
                         "pullRequests": [r for r in refs if r["name"].startswith("refs/pr/")]}, {}
        if method == "GET" and action == "commits" and len(args) == 1:
            self._repo(repo_id, user)
            return 200, [{"id": c["oid"], "title": c["summary"], "message": c["description"],
                          "authors": [{"user": self._log[c["oid"]]["author"]}], "date": self._log[c["oid"]]["date"]}
                         for c in self.commits(repo_id, args[0])[::-1]], {}
        if action == "branch" and len(args) == 1 and method in ("POST", "DELETE"):
            return self._branch(method, repo_id, args[0], user, json.loads(body or b"{}"))
        if method == "POST" and action == "preupload" and len(args) == 1:
            self._repo(repo_id, user, write=True)
            tree = self._log[self._resolve(repo_id, args[0])]["tree"]
            return 200, {"files": [{"path": f["path"], "shouldIgnore": False,  # "oid" lets the client skip no-ops
                                    "uploadMode": "lfs" if f["size"] >= self.lfs_threshold else "regular",
                                    "oid": tree[f["path"]]["key"] if f["path"] in tree else None}
                                   for f in json.loads(body)["files"]]}, {}
        if method == "POST" and action == "commit" and len(args) == 1:
            return self._commit(repo_id, args[0], user, query, headers, body)
        return None

    def _tree(self, tree: dict, prefix: str, recursive: bool) -> list[dict]:
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        paths = [p for p in sorted(tree) if p.startswith(base)]
        if base and not paths:
            raise _Reply(404, f"{prefix} does not exist", code="EntryNotFound")
        files, dirs = [], set()
        for p in paths:
            parts = p[len(base):].split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                dirs.add(base + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                files.append(self._entry_json(p, tree[p]))
        return [{"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()}
                for d in sorted(dirs)] + files

    def _branch(self, method, repo_id, branch, user, data):
        repo = self._repo(repo_id, user, write=True)
        if method == "DELETE":
            if branch == "main":
                raise _Reply(403, "Cannot delete the main branch")
            if repo["branches"].pop(branch, None) is None:
                raise _Reply(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            return 200, {}, {}
        if branch.startswith("refs/"):
            raise _Reply(400, f"Invalid reference for a branch: {branch}")
        if branch in repo["branches"]:  # create_branch(exist_ok=True) tolerates 409
            raise _Reply(409, f"Reference already exists: refs/heads/{branch}")
        repo["branches"][branch] = self._resolve(repo_id, data.get("startingPoint") or "main")
        return 200, {}, {}

    def _commit(self, repo_id, rev, user, query, headers, body):
        repo = self._repo(repo_id, user, write=True)
        create_pr = query.get("create_pr", ["0"])[0] in ("1", "true")
        if rev not in repo["branches"]:
            raise _Reply(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        if headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, "First line of the commit payload must be the header")
        header, parent = lines[0]["value"], repo["branches"][rev]
        if header.get("parentCommit") not in (None, parent):
            raise _Reply(412, "A commit has happened since. Please refresh and try again.")
        tree, paths = dict(self._log[parent]["tree"]), []
        for op in lines[1:]:
            key, v = op.get("key"), op.get("value", {})
            path = v.get("path", "")
            if key == "file":
                data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                tree[path] = {"lfs": False, "key": self._store(data), "size": len(data)}
            elif key == "lfsFile":
                size = self._lfs.get(v["oid"])
                if size is None or v.get("size", size) != size:
                    raise _Reply(400, f"LFS object {v['oid']} for {path} has not been uploaded")
                tree[path] = {"lfs": True, "key": v["oid"], "size": size}
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise _Reply(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            elif key == "deletedFolder":
                gone = [p for p in tree if p.startswith(path.rstrip("/") + "/")]
                if not gone:
                    raise _Reply(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in gone:
                    del tree[p]
            else:
                raise _Reply(400, f"Unknown commit operation {key!r}")
            paths.append(path)
        oid = self._new_commit(repo_id, parent, header.get("summary", ""), header.get("description", ""), tree,
                               paths, user["name"])
        pr_url = None
        if create_pr:
            num = 1 + sum(b.startswith("refs/pr/") for b in repo["branches"])
            rev, pr_url = f"refs/pr/{num}", f"{self.url}/{repo_id}/discussions/{num}"
        repo["branches"][rev] = oid
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
                     "pullRequestUrl": pr_url}, {}

    def _lfs_api(self, repo_id, op, headers, data):
        self._repo(repo_id, self._user(headers, required=True), write=True)
        if op == "verify":
            if self._lfs.get(data.get("oid")) != data.get("size"):
                raise _Reply(404, f"LFS object {data.get('oid')} not found")
            return 200, {}, {}
        if op != "batch" or data.get("operation") != "upload":
            return None
        objects = []
        for obj in data.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if self._lfs.get(obj["oid"]) != obj["size"]:  # not stored yet: no "chunk_size" => one single-part PUT
                self._pending[obj["oid"]] = obj["size"]
                entry.update(authenticated=True, actions={
                    "upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}}})
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}

    def _lfs_put(self, oid, body):
        if oid not in self._pending:
            raise _Reply(403, "Upload URL is not valid")
        if hashlib.sha256(body).hexdigest() != oid or len(body) != self._pending[oid]:
            raise _Reply(400, f"Uploaded content does not match oid {oid} / size {self._pending[oid]}")
        self._store(body, key=oid)
        self._lfs[oid] = self._pending.pop(oid)
        return 200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}

    def _resolve_file(self, repo_id, rev, path, headers):
        self._repo(repo_id, self._user(headers))
        oid = self._resolve(repo_id, rev)
        e = self._log[oid]["tree"].get(path)
        if e is None:
            raise _Reply(404, "Entry not found", {"X-Repo-Commit": oid}, code="EntryNotFound")
        data = (self.root / "objects" / e["key"]).read_bytes()
        out = {"X-Repo-Commit": oid, "ETag": f'"{e["key"]}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
        if e["lfs"]:
            out.update({"X-Linked-Etag": f'"{e["key"]}"', "X-Linked-Size": str(e["size"])})
        rng = headers.get("Range", "")
        if rng.startswith("bytes="):  # resumed downloads
            first, _, last = rng[len("bytes="):].partition("-")
            start = int(first) if first else len(data) - int(last)  # "bytes=-N": the last N bytes
            end = int(last) if first and last else len(data) - 1
            out["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            return 206, data[start:end + 1], out
        return 200, data, out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubStandin

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._conns.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers
            pass
        return b"".join(chunks)

    def _dispatch(self) -> None:
        hub, body, parts = self.hub, self._read_body(), urlsplit(self.path)
        with hub._lock:  # one request at a time: simple and thread-safe
            hub.requests.append({"method": self.command, "path": self.path,
                                 "headers": dict(self.headers.items()), "body": body})
            failure = next((f for f in hub._failures if f[0] in self.path and f[1] > 0), None)
            try:
                if failure is not None:
                    failure[1] -= 1
                    raise _Reply(failure[2], "HubStandin: injected failure")
                result = hub._route(self.command, parts.path, parse_qs(parts.query), self.headers, body)
                if result is None:
                    hub.unhandled.append({"method": self.command, "path": self.path})
                    raise _Reply(404, f"HubStandin: no route for {self.command} {parts.path}")
                status, payload, headers = result
            except _Reply as reply:
                status, payload, headers = reply.status, reply.payload, reply.headers
            except Exception:  # a bug in the stand-in: make it visible to tests
                hub.unhandled.append({"method": self.command, "path": self.path, "error": traceback.format_exc()})
                status, payload, headers = 500, {"error": "HubStandin internal error"}, {}
        if status == 0:  # drop the connection without any response
            self.close_connection = True
            return
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for key, value in ({} if isinstance(payload, bytes) else {"Content-Type": "application/json"}).items():
            self.send_header(key, value)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch
