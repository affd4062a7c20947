"""A local stand-in for the few Hugging Face Hub endpoints that pushing and downloading use.

It speaks the same HTTP API as huggingface.co for: creating a repo, the pre-upload check
(every file is uploaded "regular", i.e. inline in the commit), committing (NDJSON), repo info
at a revision, and resolving files. Files live in memory. Only for tests, never the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, list[str]] = {}
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self.validated: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body=b"", headers=None, content_type="application/json"):
                if isinstance(body, (dict, list)):
                    body = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def do_POST(self):
                stub.requests.append(f"POST {self.path}")
                body = self._body()
                if self.path == "/api/repos/create":
                    data = json.loads(body)
                    repo = f"{data.get('organization') or 'user'}/{data['name']}" if "/" not in data["name"] else data["name"]
                    stub.repos.setdefault(repo, {})
                    stub.commits.setdefault(repo, [])
                    return self._send(200, {"url": f"{stub.url}/{repo}", "name": repo})
                if self.path.startswith("/api/validate-yaml"):
                    import yaml  # the model card's front matter must at least parse

                    content = json.loads(body).get("content", "")
                    try:
                        yaml.safe_load(content.split("---")[1] if content.startswith("---") else content)
                    except yaml.YAMLError as e:
                        return self._send(400, {"error": f"invalid YAML: {e}"})
                    stub.validated.append(content)
                    return self._send(200, {"errors": [], "warnings": []})
                m = re.match(r"^/api/models/([^/]+/[^/]+)/preupload/([^/?]+)", self.path)
                if m:
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                      for f in files]})
                m = re.match(r"^/api/models/([^/]+/[^/]+)/commit/([^/?]+)", self.path)
                if m:
                    repo = m.group(1)
                    if repo not in stub.repos:
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    message = ""
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            message = item["value"].get("summary", "")
                        elif item["key"] == "file":
                            value = item["value"]
                            stub.repos[repo][value["path"]] = base64.b64decode(value["content"])
                        elif item["key"] == "deletedFile":
                            stub.repos[repo].pop(item["value"]["path"], None)
                        else:
                            stub.unhandled.append(f"commit item {item['key']}")
                    oid = hashlib.sha1(json.dumps(sorted(stub.repos[repo])).encode() + message.encode()).hexdigest()
                    stub.commits[repo].append(oid)
                    return self._send(200, {"commitUrl": f"{stub.url}/{repo}/commit/{oid}", "commitOid": oid,
                                            "commitMessage": message, "pullRequestUrl": None})
                stub.unhandled.append(f"POST {self.path}")
                return self._send(404, {"error": "not in the stub"})

            def do_GET(self):
                stub.requests.append(f"{self.command} {self.path}")
                m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/?]+)", self.path)
                if m:
                    files = stub.repos.get(m.group(1))
                    if files is None:
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    folders = sorted({"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)})
                    tree = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in folders]
                    tree += [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                             for n, b in sorted(files.items())]
                    return self._send(200, tree)
                m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/?]+))?(?:\?.*)?$", self.path)
                if m:
                    repo = m.group(1)
                    if repo not in stub.repos:
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    sha = (stub.commits[repo] or ["0" * 40])[-1]
                    return self._send(200, {"id": repo, "modelId": repo, "sha": sha, "private": False,
                                            "siblings": [{"rfilename": name} for name in sorted(stub.repos[repo])]})
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.path)
                if m:
                    repo, revision, name = m.group(1), m.group(2), m.group(3)
                    files = stub.repos.get(repo)
                    if files is None:
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    if name not in files:
                        return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                    data = files[name]
                    sha = (stub.commits[repo] or ["0" * 40])[-1]
                    etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                    return self._send(200, data, {"X-Repo-Commit": sha, "ETag": etag}, "application/octet-stream")
                stub.unhandled.append(f"{self.command} {self.path}")
                return self._send(404, {"error": "not in the stub"})

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
