"""``idcraft serve --ray``: a local Ray Serve with two replicas of the offline world on CPU over one Redis.
Requests spread over both replicas, a reference uploaded once serves on both, and a replica killed under
load loses no accepted request (answered by the other, or 503 with Retry-After) and comes back."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import STEPS
from .processes import free_port
from .redis_server import redis_server
from .test_stores_serve import portraits  # noqa: F401  (a fixture)

ray = pytest.importorskip("ray", reason="the Ray tests need Ray Serve: pip install 'idcraft[ray]'")
serve = pytest.importorskip("ray.serve", reason="the Ray tests need Ray Serve: pip install 'idcraft[ray]'")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """(url, redis): two world replicas on CPU behind the gateway, on a fresh Redis."""
    from idcraft.serve.config import RayConfig, ServeConfig, ServerConfig
    from idcraft.serve.ray_app import build

    saved = dict(os.environ)
    os.environ.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    os.environ.pop("IDCRAFT_API_TOKEN", None)
    with redis_server(tmp_path_factory.mktemp("redis")) as redis:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="idcraft-test")
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = ServeConfig(
                server=ServerConfig(store=redis.url, store_retry_s=2),
                ray=RayConfig(replicas=2, num_gpus=0, num_cpus=0.5, graceful_shutdown_timeout_s=5),
            )
            config.world.device = "cpu"
            config.world.examples = 0
            serve.run(build(config), name="idcraft", route_prefix="/")
            yield f"http://127.0.0.1:{port}", redis
        finally:
            serve.shutdown()
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)


def generate(url: str, reference: str, seed: int, steps: int = STEPS) -> httpx.Response:
    body = {"prompt": "a portrait", "references": [reference], "steps": steps, "seed": seed}
    return httpx.post(url + "/v1/images/generations", json=body, timeout=120)


def spread(url: str, reference: str, count: int, steps: int = STEPS) -> list[httpx.Response]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda seed: generate(url, reference, seed, steps), range(count)))


def test_replicas_share_one_upload_and_spread_the_requests(deployment, portraits):  # noqa: F811
    url, _ = deployment
    upload = httpx.post(url + "/v1/references", json={"image": portraits[0]}, timeout=60)
    assert upload.status_code == 200, upload.text
    answers = spread(url, upload.json()["id"], 8)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    by_replica: dict[str, int] = {}
    for answer in answers:
        by_replica[answer.headers["x-idcraft-replica"]] = (
            by_replica.get(answer.headers["x-idcraft-replica"], 0) + 1
        )
    assert len(by_replica) == 2, by_replica  # both replicas answered, each from the one upload
    caches = [a.json()["cache"] for a in answers]
    assert caches.count("miss") <= 2 and caches.count("hit") >= 6  # encoded at most once per replica
    ready = httpx.get(url + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["store"]["kind"] == "redis"
    error = httpx.post(
        url + "/v1/images/generations", json={"prompt": "x", "references": ["0" * 64]}, timeout=30
    )
    assert error.status_code == 404 and "no such reference" in error.json()["error"]["message"]


def test_a_replica_killed_under_load_loses_no_request_and_comes_back(deployment, portraits):  # noqa: F811
    url, _ = deployment
    reference = httpx.post(url + "/v1/references", json={"image": portraits[1]}, timeout=60).json()["id"]
    first = generate(url, reference, 0)
    victim, pid = first.headers["x-idcraft-replica"], int(first.headers["x-idcraft-replica-pid"])
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(generate, url, reference, seed, 6) for seed in range(1, 9)]
        time.sleep(1.0)  # requests accepted and running on both replicas
        os.kill(pid, signal.SIGKILL)
        answers = [p.result() for p in pending]
    statuses = [a.status_code for a in answers]
    story = [
        (a.status_code, a.headers.get("x-idcraft-replica"), a.headers.get("x-idcraft-retried"))
        for a in answers
    ]
    assert set(statuses) <= {200, 503}, [a.text for a in answers if a.status_code not in (200, 503)]
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 503)
    assert statuses.count(200) >= 4, story
    # the victim was answering some of them: those were handed to the other replica (or refused, 503)
    assert sum(1 for a in answers if a.headers.get("x-idcraft-retried") or a.status_code == 503) >= 1, (
        victim,
        story,
    )
    deadline = time.monotonic() + 150  # Ray Serve starts a replica in the dead one's place
    seen: set[str] = set()
    while time.monotonic() < deadline:
        seen |= {a.headers["x-idcraft-replica"] for a in spread(url, reference, 4) if a.status_code == 200}
        if len(seen - {victim}) >= 2:
            break
        time.sleep(0.25)
    assert len(seen - {victim}) >= 2, f"no new replica came back (answered by {seen})"
