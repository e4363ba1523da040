"""A small Hugging Face Hub-compatible HTTP server, for tests and offline development.

It speaks enough of the Hub's HTTP API for the real `huggingface_hub` client to create repos, commit files
(regular and LFS, without Xet), download them, and read model info, trees, refs and history. Repos live in
memory; commits are real (a sha per commit, parent chain, 412 on a stale parent commit).

>>> from hub.server import HubServer
>>> server = HubServer().start()            # 127.0.0.1, a free port
>>> token = server.add_user("alice")        # a write token for the namespace "alice"
>>> # HfApi(endpoint=server.url, token=token).create_repo("alice/demo")
>>> server.stop()

Run it by hand (then `export HF_ENDPOINT=http://127.0.0.1:8080 HF_HUB_DISABLE_XET=1` before importing the client):

    python -m hub.server --port 8080 --user alice:hf_alice_token

Switches for tests: `server.fail(status, path=regex, method=..., times=n)` answers the next n matching requests
with an error (404/429/5xx...); `server.corrupt(path_regex)` serves altered file bytes; `server.gate(repo, *users)`
makes a repo gated; `server.requests` logs every request as `(method, path, status)`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB with LFS
LFS_PATTERNS = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|loki|npz|zip|tar|gz)$")
GITATTRIBUTES = "".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in ("safetensors", "bin", "pt", "gguf", "loki")
).encode()
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:  # what the Hub sends: sha256 for LFS files, the git blob sha1 otherwise
        return self.sha256 if self.lfs else git_blob_sha1(self.data)

    def entry(self, path: str) -> dict[str, Any]:
        out = {"type": "file", "path": path, "size": len(self.data), "oid": git_blob_sha1(self.data)}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return out


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    id: str
    private: bool
    created: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    downloads: int = 0
    gated: bool = False  # files served only to writers and `granted` users (the listing and model info stay public)
    granted: set[str] = field(default_factory=set)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [s for s in self.commits if s.startswith(revision)]
            sha = matches[0] if len(matches) == 1 else None
        return self.commits.get(sha) if sha else None

    def commit(self, branch: str, files: dict[str, Blob], title: str, message: str, author: str) -> Commit:
        parent = self.branches.get(branch)
        sha = hashlib.sha1(
            f"{self.id}\0{parent}\0{title}\0{time.time_ns()}\0{secrets.token_hex(8)}".encode()
        ).hexdigest()
        c = Commit(sha, parent, files, title, message, author, _now())
        self.commits[sha] = c
        self.branches[branch] = sha
        return c


class HubError(Exception):
    """An HTTP error answer: status, message, and the `X-Error-Code` the client maps to an exception."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body


@dataclass
class Failure:
    status: int
    path: re.Pattern
    method: str | None
    times: int | None
    headers: dict[str, str]
    message: str


class HubServer:
    """The in-memory Hub. `start()` serves it on a background thread; `url` is the endpoint to give the client."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, str] = {}  # token -> user
        self.orgs: dict[str, set[str]] = {}  # user -> namespaces they can write besides their own
        self.lfs_store: dict[str, bytes] = {}  # sha256 -> bytes uploaded through the LFS batch API
        self.requests: list[tuple[str, str, int]] = []
        self.failures: list[Failure] = []
        self.corrupted: list[re.Pattern] = []
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._httpd = ThreadingHTTPServer((self.host, self.port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test switches ----------------------------------------------------------------------------
    def add_user(self, name: str, token: str | None = None, orgs: tuple[str, ...] = ()) -> str:
        """Register `name` with a write token (returned) for its own namespace and `orgs`."""
        token = token or f"hf_{name}_{secrets.token_hex(8)}"
        with self.lock:
            self.tokens[token] = name
            self.orgs[name] = set(orgs)
        return token

    def fail(
        self,
        status: int,
        path: str = ".*",
        *,
        method: str | None = None,
        times: int | None = 1,
        headers: dict[str, str] | None = None,
        message: str = "Injected failure",
    ) -> None:
        """Answer the next `times` requests (None: all) whose path matches `path` (a regex searched in the URL
        path) with `status`. A 429 carries rate-limit headers saying the quota is spent for 60 s."""
        if status == 429 and headers is None:
            headers = {"RateLimit": '"api";r=0;t=60', "RateLimit-Policy": '"fixed window";"api";q=500;w=300'}
        with self.lock:
            self.failures.append(Failure(status, re.compile(path), method, times, headers or {}, message))

    def gate(self, repo_id: str, *granted: str) -> None:
        """Make a repo gated: its files are served to its writers and the `granted` users only; anyone else gets
        401/403 with `X-Error-Code: GatedRepo`, as on the Hub. Calling it again grants more users."""
        with self.lock:
            repo = self.repos[repo_id]
            repo.gated = True
            repo.granted.update(granted)

    def corrupt(self, path: str) -> None:
        """Serve the bytes of matching files with their first byte flipped (same size, same headers)."""
        with self.lock:
            self.corrupted.append(re.compile(path))

    def clear(self) -> None:
        """Forget injected failures, corruption and the request log."""
        with self.lock:
            self.failures.clear()
            self.corrupted.clear()
            self.requests.clear()

    def count(self, method: str | None = None, path: str = ".*") -> int:
        """How many logged requests match `method` and the path regex."""
        rx = re.compile(path)
        return sum(1 for m, p, _ in self.requests if (method is None or m == method) and rx.search(p))

    def _injected(self, method: str, path: str) -> Failure | None:
        with self.lock:
            for f in self.failures:
                if (f.method is None or f.method == method) and f.path.search(path):
                    if f.times is not None:
                        f.times -= 1
                        if f.times <= 0:
                            self.failures.remove(f)
                    return f
        return None

    # -- permissions ------------------------------------------------------------------------------
    def user_of(self, headers) -> str | None:
        auth = headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def can_write(self, user: str | None, repo_id: str) -> bool:
        namespace = repo_id.split("/")[0]
        return user is not None and (namespace == user or namespace in self.orgs.get(user, ()))

    def readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self.can_write(user, repo_id)):
            # The Hub answers the same for missing and private repos, so private names do not leak.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.readable(repo_id, user)
        if not self.can_write(user, repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}; use a token with write access.")
        return repo

    @staticmethod
    def revision(repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit


# -- request handling -------------------------------------------------------------------------------
_ROUTES: list[tuple[str, re.Pattern, str]] = []


def route(method: str, pattern: str):
    def register(fn):
        _ROUTES.append((method, re.compile("^" + pattern + "$"), fn.__name__))
        return fn

    return register


_REPO = r"(?P<repo>[^/]+/[^/]+)"


def _make_handler(hub: HubServer):
    class Handler(_Handler):
        server_state = hub

    return Handler


class _Handler(BaseHTTPRequestHandler):
    server_state: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -- plumbing ---------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        hub = self.server_state
        split = urlsplit(self.path)
        raw_path, self.query = split.path, parse_qs(split.query)
        self.logged = (method, raw_path)
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""  # always drain the body, even to answer an error
        try:
            failure = hub._injected(method, raw_path)
            if failure is not None:
                raise HubError(failure.status, failure.message, None, failure.headers)
            for m, rx, name in _ROUTES:
                match = rx.match(raw_path)
                if match and (m == method or (m == "GET" and method == "HEAD")):
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with hub.lock:
                        self.user = hub.user_of(self.headers)
                    getattr(self, name)(**args)  # every answer goes through _send, which logs it
                    break
            else:
                raise HubError(404, f"No route for {method} {raw_path}")
        except HubError as e:
            self._send(
                e.status,
                {"error": e.message, **e.body},
                {
                    **({"X-Error-Code": e.code} if e.code else {}),
                    "X-Error-Message": e.message,
                    **e.headers,
                },
            )
        except Exception as e:  # a bug in the server: answer 500 with the reason, keep serving
            self._send(500, {"error": f"{type(e).__name__}: {e}"})

    def _send(self, status: int, payload: Any = None, headers: dict | None = None, raw: bytes | None = None) -> int:
        body = raw if raw is not None else json.dumps(payload).encode()
        # logged before the client can read the answer: a test that clears the log right after a call must not
        # see that call's entry arrive late
        with self.server_state.lock:
            self.server_state.requests.append((*self.logged, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError:
            raise HubError(400, "The request body is not valid JSON.") from None

    @property
    def base(self) -> str:
        return self.server_state.url

    # -- repos ------------------------------------------------------------------------------------
    @route("GET", "/api/whoami-v2")
    def whoami(self):
        if self.user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        orgs = [{"name": o, "type": "org"} for o in sorted(self.server_state.orgs.get(self.user, ()))]
        return self._send(
            200,
            {
                "type": "user",
                "name": self.user,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"role": "write"}},
            },
        )

    @route("POST", "/api/repos/create")
    def create_repo(self):
        hub, data = self.server_state, self._json()
        repo_id = f"{data.get('organization') or self.user}/{data.get('name')}"
        if data.get("type", "model") != "model":
            raise HubError(400, "This test server hosts model repos only.")
        if not hub.can_write(self.user, repo_id):
            raise HubError(
                403 if self.user else 401, f"You don't have the rights to create a repo under {repo_id.split('/')[0]}."
            )
        with hub.lock:
            if repo_id in hub.repos:
                raise HubError(409, "You already created this model repo", url=f"{self.base}/{repo_id}")
            private = data.get("visibility", "private" if data.get("private") else "public") != "public"
            repo = hub.repos[repo_id] = Repo(repo_id, private)
            repo.commit("main", {".gitattributes": Blob(GITATTRIBUTES, False)}, "initial commit", "", self.user)
        return self._send(200, {"url": f"{self.base}/{repo_id}", "name": repo_id, "id": repo_id})

    @route("DELETE", "/api/repos/delete")
    def delete_repo(self):
        hub, data = self.server_state, self._json()
        repo_id = f"{data.get('organization') or self.user}/{data.get('name')}"
        with hub.lock:
            hub.writable(repo_id, self.user)
            del hub.repos[repo_id]
        return self._send(200, {})

    @route("PUT", f"/api/models/{_REPO}/settings")
    def settings(self, repo):
        hub, data = self.server_state, self._json()
        with hub.lock:
            r = hub.writable(repo, self.user)
            if "private" in data:
                r.private = bool(data["private"])
            if "visibility" in data:
                r.private = data["visibility"] != "public"
        return self._send(200, {})

    @route("GET", f"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?")
    def model_info(self, repo, rev=None):
        hub = self.server_state
        with hub.lock:
            r = hub.readable(repo, self.user)
            c = hub.revision(r, rev or "main")
        card = _card_data(c.files.get("README.md"))
        blobs = "blobs" in self.query
        siblings = [
            {
                "rfilename": p,
                **(
                    {
                        "size": len(b.data),
                        "blobId": git_blob_sha1(b.data),
                        **({"lfs": {"sha256": b.sha256, "size": len(b.data), "pointerSize": 134}} if b.lfs else {}),
                    }
                    if blobs
                    else {}
                ),
            }
            for p, b in sorted(c.files.items())
        ]
        tags = list(card.get("tags") or []) if isinstance(card.get("tags"), list) else []
        for key in ("library_name", "license"):
            if isinstance(card.get(key), str):
                tags.append(card[key] if key == "library_name" else f"license:{card[key]}")
        base = card.get("base_model")
        for b in [base] if isinstance(base, str) else (base or []):
            tags.append(f"base_model:{b}")
            if card.get("base_model_relation"):
                tags.append(f"base_model:{card['base_model_relation']}:{b}")
        return self._send(
            200,
            {
                "_id": hashlib.md5(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": c.sha,
                "lastModified": c.date,
                "createdAt": r.created,
                "private": r.private,
                "disabled": False,
                "gated": "manual" if r.gated else False,
                "downloads": r.downloads,
                "likes": 0,
                "library_name": card.get("library_name"),
                "tags": tags,
                "cardData": card or None,
                "siblings": siblings,
            },
        )

    @route("POST", "/api/validate-yaml")
    def validate_yaml(self):
        data = self._json()
        try:
            _front_matter(data.get("content", ""))
        except (yaml.YAMLError, ValueError) as e:
            raise HubError(400, f"Invalid metadata in README.md: {e}") from None
        return self._send(200, {"errors": [], "warnings": []})

    # -- upload -----------------------------------------------------------------------------------
    @route("POST", f"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)")
    def preupload(self, repo, rev):
        hub, data = self.server_state, self._json()
        with hub.lock:
            r = hub.writable(repo, self.user)
            current = r.resolve(rev)
        files = []
        for f in data.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f.get("size", 0) > LFS_THRESHOLD or b"\0" in sample or bool(LFS_PATTERNS.match(f["path"]))
            old = current.files.get(f["path"]) if current else None
            oid = None if old is None else (old.sha256 if old.lfs else git_blob_sha1(old.data))
            files.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return self._send(200, {"files": files, "commitOid": current.sha if current else None})

    @route("POST", rf"/{_REPO}\.git/info/lfs/objects/batch")
    def lfs_batch(self, repo):
        hub, data = self.server_state, self._json()
        with hub.lock:
            hub.writable(repo, self.user)
            stored = set(hub.lfs_store)
        objects = []
        for o in data.get("objects", []):
            obj = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in stored:
                obj["actions"] = {"upload": {"href": f"{self.base}/lfs-upload/{quote(repo, safe='/')}/{o['oid']}"}}
            objects.append(obj)
        return self._send(200, {"transfer": "basic", "objects": objects})

    @route("PUT", f"/lfs-upload/{_REPO}/(?P<oid>[0-9a-f]{{64}})")
    def lfs_upload(self, repo, oid):
        hub = self.server_state
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "The uploaded bytes do not match their sha256 oid.")
        with hub.lock:
            hub.lfs_store[oid] = self.body
        return self._send(200, {})

    @route("GET", f"/api/models/{_REPO}/xet-write-token/(?P<rev>.*)")
    def xet_write_token(self, repo, rev):
        raise HubError(
            501, "This test server does not speak Xet: set HF_HUB_DISABLE_XET=1 before importing huggingface_hub."
        )

    @route("POST", f"/api/models/{_REPO}/commit/(?P<rev>[^/]+)")
    def commit(self, repo, rev):
        hub = self.server_state
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next((l["value"] for l in lines if l.get("key") == "header"), {})
        with hub.lock:
            r = hub.writable(repo, self.user)
            if rev not in r.branches:
                if SHA_RE.match(rev) or rev in r.tags:
                    raise HubError(400, f"Can only commit to a branch, not {rev}.")
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = r.commits[r.branches[rev]]
            parent = header.get("parentCommit")
            if parent is not None and parent != head.sha:
                raise HubError(412, f"A commit has happened since {parent}; pull and try again (head is {head.sha}).")
            files = dict(head.files)
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    files[value["path"]] = Blob(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    data = hub.lfs_store.get(value["oid"])
                    if data is None:
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded.")
                    files[value["path"]] = Blob(data, True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, f"{value['path']} does not exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            c = r.commit(
                rev, files, header.get("summary") or "Upload files", header.get("description") or "", self.user
            )
        return self._send(
            200,
            {
                "commitUrl": f"{self.base}/{repo}/commit/{c.sha}",
                "commitOid": c.sha,
                "pullRequestUrl": None,
                "success": True,
            },
        )

    # -- download ---------------------------------------------------------------------------------
    @route("GET", f"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
    def resolve(self, repo, rev, path):
        hub = self.server_state
        with hub.lock:
            r = hub.readable(repo, self.user)
            if r.gated and not (hub.can_write(self.user, repo) or self.user in r.granted):
                raise HubError(
                    401 if self.user is None else 403,
                    f"Access to model {repo} is restricted. You must have "
                    "access to it and be authenticated to access it.",
                    "GatedRepo",
                )
            c = hub.revision(r, rev)
            blob = c.files.get(path)
            if blob is None:
                raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound", {"X-Repo-Commit": c.sha})
            corrupt = any(p.search(path) for p in hub.corrupted)
            if self.command == "GET" and path == "config.json":
                r.downloads += 1
        data = blob.data
        if corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {"X-Repo-Commit": c.sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "none"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(data))})
        return self._send(200, headers=headers, raw=data)

    @route("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")
    def tree(self, repo, rev, path=None):
        hub = self.server_state
        with hub.lock:
            c = hub.revision(hub.readable(repo, self.user), rev)
        prefix = (path or "").strip("/")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for p, b in sorted(c.files.items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rest = p[len(prefix) + 1 :] if prefix else p
            parts = rest.split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add("/".join(([prefix] if prefix else []) + parts[:i]))
            if recursive or len(parts) == 1:
                entries.append(b.entry(p))
        if prefix and not entries and not folders:
            raise HubError(404, f"{prefix} does not exist at {rev}", "EntryNotFound")
        entries += [
            {"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
            for f in sorted(folders)
        ]
        return self._send(200, entries)

    @route("POST", rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)")
    def paths_info(self, repo, rev):
        hub = self.server_state
        with hub.lock:
            c = hub.revision(hub.readable(repo, self.user), rev)
        paths = self._form_or_json().get("paths", [])
        return self._send(200, [c.files[p].entry(p) for p in paths if p in c.files])

    def _form_or_json(self) -> dict:
        if self.headers.get("Content-Type", "").startswith("application/json"):
            return self._json()
        return {k: v for k, v in parse_qs(self.body.decode()).items()}

    # -- refs and history -------------------------------------------------------------------------
    @route("GET", f"/api/models/{_REPO}/refs")
    def refs(self, repo):
        hub = self.server_state
        with hub.lock:
            r = hub.readable(repo, self.user)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in sorted(r.branches.items())]
            tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in sorted(r.tags.items())]
        return self._send(200, {"branches": branches, "tags": tags, "converts": [], "pullRequests": []})

    @route("GET", f"/api/models/{_REPO}/commits/(?P<rev>[^/]+)")
    def commits(self, repo, rev):
        hub = self.server_state
        out = []
        with hub.lock:
            r = hub.readable(repo, self.user)
            c = hub.revision(r, rev)
            while c is not None:
                out.append(
                    {
                        "id": c.sha,
                        "title": c.title,
                        "message": c.message,
                        "date": c.date,
                        "authors": [{"user": c.author or "unknown"}],
                    }
                )
                c = r.commits.get(c.parent) if c.parent else None
        return self._send(200, out)

    @route("POST", f"/api/models/{_REPO}/branch/(?P<branch>[^/]+)")
    def create_branch(self, repo, branch):
        hub, data = self.server_state, self._json()
        with hub.lock:
            r = hub.writable(repo, self.user)
            if branch in r.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            r.branches[branch] = hub.revision(r, data.get("startingPoint") or "main").sha
        return self._send(200, {})

    @route("DELETE", f"/api/models/{_REPO}/(?P<kind>branch|tag)/(?P<name>[^/]+)")
    def delete_ref(self, repo, kind, name):
        hub = self.server_state
        with hub.lock:
            r = hub.writable(repo, self.user)
            if (r.branches if kind == "branch" else r.tags).pop(name, None) is None:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        return self._send(200, {})

    @route("POST", f"/api/models/{_REPO}/tag/(?P<rev>[^/]+)")
    def create_tag(self, repo, rev):
        hub, data = self.server_state, self._json()
        with hub.lock:
            r = hub.writable(repo, self.user)
            tag = data.get("tag", "")
            if tag in r.tags:
                raise HubError(409, f"Tag {tag} already exists")
            r.tags[tag] = hub.revision(r, rev).sha
        return self._send(200, {})


def _front_matter(text: str) -> dict:
    """The YAML metadata block at the top of a model card (`---` ... `---`), as a dict."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        raise ValueError("the metadata block opened with '---' is never closed")
    data = yaml.safe_load(text[3:end]) or {}
    if not isinstance(data, dict):
        raise ValueError("the metadata block must be a mapping")
    return data


def _card_data(blob: Blob | None) -> dict:
    if blob is None:
        return {}
    try:
        return _front_matter(blob.data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the in-memory Hub-compatible test server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="NAME:TOKEN",
        help="a user and its write token (repeatable); default alice:hf_alice",
    )
    args = parser.parse_args(argv)
    server = HubServer(args.host, args.port)
    for spec in args.user or ["alice:hf_alice"]:
        name, _, token = spec.partition(":")
        server.add_user(name, token or None)
    server.start()
    print(f"Hub test server at {server.url} (users: {', '.join(server.tokens.values())}).")
    print(f"export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
