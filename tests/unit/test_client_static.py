"""What the admin API answers for the dashboard and the browser client
(engine.admin.http, pure): names, content types, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.admin import http

STATIC = Path(__file__).resolve().parents[2] / "engine" / "static"


@pytest.mark.parametrize(
    ("path", "name", "ctype"),
    [
        ("/", "index.html", "text/html; charset=utf-8"),
        ("/static/fanout.js", "fanout.js", "text/javascript; charset=utf-8"),
        ("/static/dashboard.css", "dashboard.css", "text/css; charset=utf-8"),
        ("/static/fanout.d.ts", "fanout.d.ts", "text/plain; charset=utf-8"),
    ],
)
def test_static_names_and_types(path: str, name: str, ctype: str) -> None:
    assert http.static_file(path) == (name, ctype)
    assert (STATIC / name).is_file()
    assert http.plan_request("GET", path, {}, api_key="k", body_limit=10) == http.Plan(path)


@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static/../http.py",
        "/static/..",
        "/static/.hidden.js",
        "/static/a/b.js",
        "/static/%2e%2e/x.js",
        "/static/noext",
        "/static/x.py",
        "/static/" + "a" * 200 + ".js",
        "/index.html",
    ],
)
def test_names_outside_the_static_folder_are_404(path: str) -> None:
    with pytest.raises(http.HttpError) as info:
        http.plan_request("GET", path, {}, api_key=None, body_limit=10)
    assert info.value.status == 404


def test_static_files_are_get_only_and_need_no_api_key() -> None:
    with pytest.raises(http.HttpError) as info:
        http.plan_request("POST", "/static/fanout.js", {}, api_key=None, body_limit=10)
    assert info.value.status == 405
    # the API key guards /publish only
    assert http.plan_request("GET", "/?ws=x", {}, api_key="secret", body_limit=10).path == "/"


def test_client_config_names_the_websocket_port_and_path() -> None:
    r = http.client_config(8000, "/ws")
    assert r.status == 200 and r.content_type == http.JSON_TYPE
    assert json.loads(r.body) == {"ws_port": 8000, "ws_path": "/ws"}
    assert http.static_response("text/css", b"x").content_type == "text/css"
