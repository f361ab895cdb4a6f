"""Bearer-token auth from an environment variable, and CORS only when configured."""

from __future__ import annotations

import httpx
from fastapi.testclient import TestClient

from .conftest import STEPS


def test_token_is_required_when_the_variable_is_set(make_app, references, monkeypatch):
    monkeypatch.setenv("IDCRAFT_API_TOKEN", "s3cret")
    app, _ = make_app()
    with TestClient(app) as http:
        for path in ("/v1/models", "/v1/examples", "/metrics"):
            refused = http.get(path)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
            assert refused.headers["WWW-Authenticate"] == "Bearer"
        body = {"prompt": "x", "references": [references[0]], "steps": STEPS}
        assert http.post("/v1/images/generations", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert http.post("/v1/images/generations", json=body, headers=wrong).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert http.post("/v1/images/generations", json=body, headers=good).status_code == 200
        assert http.get("/v1/models", headers=good).status_code == 200
        assert http.get("/healthz").status_code == 200 and http.get("/").status_code == 200


def test_the_variable_name_comes_from_the_config(make_app, monkeypatch):
    monkeypatch.delenv("IDCRAFT_API_TOKEN", raising=False)
    monkeypatch.setenv("MY_TOKEN", "t")
    app, _ = make_app(auth_token_env="MY_TOKEN")
    with TestClient(app) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "bearer t"}).status_code == 200
    open_app, _ = make_app(auth_token_env="UNSET_TOKEN_VARIABLE")
    with TestClient(open_app) as http:
        assert http.get("/v1/models").status_code == 200


def test_cors_off_unless_configured(make_app, monkeypatch):
    monkeypatch.delenv("IDCRAFT_API_TOKEN", raising=False)
    preflight = {
        "Origin": "http://example.test",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    app, _ = make_app()
    with TestClient(app) as http:
        answer = http.options("/v1/images/generations", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
        assert (
            "access-control-allow-origin"
            not in http.get("/v1/models", headers={"Origin": "http://example.test"}).headers
        )
    app, _ = make_app(cors_origins=["http://example.test"])
    with TestClient(app) as http:
        answer = http.options("/v1/images/generations", headers=preflight)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "http://example.test"
        other = http.get("/v1/models", headers={"Origin": "http://elsewhere.test"})
        assert "access-control-allow-origin" not in other.headers


def raw_exchange(url: str, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``head`` (and ``body``) on a plain socket, read until the server closes or answers; the
    answer's bytes and the seconds it took."""
    import socket
    import time

    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer, time.monotonic() - start


def post_head(path: str, length: int, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_token_is_checked_before_the_body_is_read(make_app, monkeypatch):
    from idcraft.serve.server import BackgroundServer

    monkeypatch.setenv("IDCRAFT_API_TOKEN", "s3cret")
    app, service = make_app()
    with BackgroundServer(app, service.config) as server:
        # 15 MB announced, not one byte of it sent: the answer comes from the headers alone
        for path in ("/v1/images/generations", "/v1/jobs", "/v1/references"):
            answer, seconds = raw_exchange(server.url, post_head(path, 15_000_000))
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
            assert b'"unauthorized"' in answer and seconds < 5
        wrong, _ = raw_exchange(server.url, post_head("/v1/jobs", 15_000_000, token="nope"))
        assert wrong.startswith(b"HTTP/1.1 401")
        # a wrong token with a malformed body is still 401, not 400: nothing was parsed
        junk = b"{not json"
        answer, _ = raw_exchange(server.url, post_head("/v1/images/generations", len(junk)), junk)
        assert answer.startswith(b"HTTP/1.1 401")


def test_a_body_that_stalls_is_408(make_app, monkeypatch):
    from idcraft.serve.server import BackgroundServer

    monkeypatch.setenv("IDCRAFT_API_TOKEN", "s3cret")
    app, service = make_app(body_timeout_s=0.5)
    with BackgroundServer(app, service.config) as server:
        part = b'{"prompt": "a portr'
        head = post_head("/v1/images/generations", 1000, token="s3cret")
        answer, seconds = raw_exchange(server.url, head, part)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"did not arrive within 0.5 s" in answer and 0.4 < seconds < 5
        assert httpx.get(server.url + "/healthz").status_code == 200
