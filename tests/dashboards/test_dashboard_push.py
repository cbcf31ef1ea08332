"""`ringwatch dashboards push` against a small fake of Grafana's HTTP API on loopback, which
records every request: the bearer token, the folder it finds or creates, and each dashboard
posted with overwrite into that folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ringwatch.dashboards import load_all

TOKEN = "glsa_test_token_0123"


class FakeGrafana:
    """Answers /api/folders (GET, POST) and /api/dashboards/db (POST) as Grafana 11 does;
    ``status`` (when set) is the answer to every request instead."""

    def __init__(self, folders=()):
        self.requests: list[dict] = []
        self.folders = [dict(f) for f in folders]
        self.status: int | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, code: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                fake.requests.append({"method": method, "path": self.path,
                                      "auth": self.headers.get("Authorization"),
                                      "body": body})
                if fake.status is not None:
                    return self._answer(fake.status, {"message": "Unauthorized"})
                if (method, self.path) == ("GET", "/api/folders"):
                    return self._answer(200, fake.folders)
                if (method, self.path) == ("POST", "/api/folders"):
                    folder = {"id": len(fake.folders) + 1, "uid": body.get("uid", "x"),
                              "title": body["title"]}
                    fake.folders.append(folder)
                    return self._answer(200, folder)
                if (method, self.path) == ("POST", "/api/dashboards/db"):
                    uid = body["dashboard"]["uid"]
                    return self._answer(200, {"id": 7, "uid": uid, "status": "success",
                                              "url": f"/d/{uid}/x", "version": 1})
                return self._answer(404, {"message": "Not found"})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _push(*args: str, token: str | None = TOKEN):
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "grafana_token")}
    if token is not None:
        env["GRAFANA_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "ringwatch._cli", "dashboards", "push", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_push_creates_the_folder_and_posts_every_dashboard_with_overwrite():
    with FakeGrafana() as g:
        out = _push("--url", g.url, "--folder", "ringwatch ML")
    assert out.returncode == 0, out.stderr
    assert {r["auth"] for r in g.requests} == {f"Bearer {TOKEN}"}
    assert [(r["method"], r["path"]) for r in g.requests[:2]] == [
        ("GET", "/api/folders"), ("POST", "/api/folders")]
    assert g.requests[1]["body"] == {"title": "ringwatch ML", "uid": "ringwatch-ml"}
    posts = [r["body"] for r in g.requests if r["path"] == "/api/dashboards/db"]
    committed = load_all()
    assert [p["dashboard"]["uid"] for p in posts] == list(committed)
    for p in posts:
        assert p["overwrite"] is True and p["folderUid"] == "ringwatch-ml"
        assert p["dashboard"].pop("id") is None
        assert p["dashboard"] == committed[p["dashboard"]["uid"]]
    assert len(out.stdout.splitlines()) == 5 and "ringwatch-fleet: success" in out.stdout


def test_an_existing_folder_is_reused_and_the_datasource_pinned(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file-token\n")
    with FakeGrafana(folders=[{"id": 3, "uid": "abc123", "title": "ringwatch"}]) as g:
        out = _push("--url", g.url, "--token-file", str(token_file), "--datasource-uid",
                    "prom-a", token=None)
    assert out.returncode == 0, out.stderr
    assert ("POST", "/api/folders") not in {(r["method"], r["path"]) for r in g.requests}
    assert {r["auth"] for r in g.requests} == {"Bearer from-file-token"}
    posts = [r["body"] for r in g.requests if r["path"] == "/api/dashboards/db"]
    assert len(posts) == 5 and {p["folderUid"] for p in posts} == {"abc123"}
    for p in posts:
        (ds,) = [v for v in p["dashboard"]["templating"]["list"] if v["type"] == "datasource"]
        assert ds["current"] == {"text": "prom-a", "value": "prom-a"}


def test_no_token_is_one_line_and_no_request():
    with FakeGrafana() as g:
        out = _push("--url", g.url, token=None)
    assert out.returncode == 1 and g.requests == []
    assert out.stderr.strip().count("\n") == 0 and "GRAFANA_TOKEN" in out.stderr


def test_a_refusal_is_one_line_and_exit_1():
    with FakeGrafana() as g:
        g.status = 401
        out = _push("--url", g.url)
    assert out.returncode == 1, out.stdout
    assert out.stderr.strip().count("\n") == 0 and "refused" in out.stderr, out.stderr


@pytest.mark.parametrize("flag", ["--token", "--password"])
def test_the_token_cannot_be_given_on_the_command_line(flag):
    out = _push("--url", "http://127.0.0.1:9", flag, "x")
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr
