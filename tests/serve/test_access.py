"""Bearer-token auth from an environment variable, and CORS only when configured."""

from __future__ import annotations

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
