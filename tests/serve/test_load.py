"""Load bounds on a real uvicorn server (a thread, a free local port) on the offline world: the queue
limit (429), timeouts (504), body size (413), concurrent requests, faults (500) and graceful shutdown."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from .conftest import STEPS, GatedEngine, pixels


def body(reference: str, **extra) -> dict:
    return {"prompt": "a portrait in a garden", "references": [reference], "steps": STEPS, "seed": 5, **extra}


def serve(make_app, engine=None, **server):
    from idcraft.serve.server import BackgroundServer

    app, service = make_app(engine, **server)
    return BackgroundServer(app, service.config), service


def wait_until(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def test_full_queue_answers_429_and_the_rest_complete(make_app, world, references):
    gated = GatedEngine(world, gate=threading.Event())
    server, service = serve(make_app, gated, queue_length=1, concurrency_per_device=1)
    with server, httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(2) as pool:
        running = pool.submit(http.post, "/v1/images/generations", json=body(references[0]))
        wait_until(lambda: service.scheduler.running == 1)
        queued = pool.submit(http.post, "/v1/images/generations", json=body(references[1]))
        wait_until(lambda: service.scheduler.waiting == 1)
        refused = http.post("/v1/images/generations", json=body(references[2]))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "queue_full"
        assert int(refused.headers["Retry-After"]) >= 1
        assert http.get("/healthz").json()["queue"]["waiting"] == 1  # alive while full
        gated.gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
        assert http.post("/v1/images/generations", json=body(references[2])).status_code == 200
        text = http.get("/metrics").text
    assert 'idcraft_errors_total{type="queue_full",status="429"} 1' in text


def test_timeouts_answer_504_and_free_the_slot_afterwards(make_app, world, references):
    gated = GatedEngine(world, gate=threading.Event())
    server, service = serve(make_app, gated, request_timeout_s=0.5, queue_length=4)
    with server, httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        running = pool.submit(http.post, "/v1/images/generations", json=body(references[0]))
        wait_until(lambda: service.scheduler.running == 1)
        queued = http.post("/v1/images/generations", json=body(references[1]))  # waits behind it, times out
        assert queued.status_code == 504 and "queue" in queued.json()["error"]["message"]
        slow = running.result()
        assert slow.status_code == 504 and slow.json()["error"]["type"] == "timeout"
        assert (
            service.scheduler.running == 1
        )  # the thread still holds its slot: the device is not oversubscribed
        gated.gate.set()
        wait_until(lambda: service.scheduler.running == 0)
        service.config.server.request_timeout_s = 60
        assert http.post("/v1/images/generations", json=body(references[1])).status_code == 200


def test_concurrent_requests_give_the_images_each_gives_alone(make_app, world, references):
    alone_server, _ = serve(make_app)
    with alone_server, httpx.Client(base_url=alone_server.url, timeout=60) as http:
        alone = [
            http.post("/v1/images/generations", json=body(r, method=m)).json()
            for r, m in ((references[0], "ip-adapter"), (references[1], "faceid"))
        ]
    barrier = threading.Barrier(2)  # both requests are inside engine.generate at the same time
    gated = GatedEngine(world, barrier=barrier)
    server, _ = serve(make_app, gated, concurrency_per_device=2)
    with server, httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(http.post, "/v1/images/generations", json=body(r, method=m))
            for r, m in ((references[0], "ip-adapter"), (references[1], "faceid"))
        ]
        together = [f.result().json() for f in futures]
    for one, both in zip(alone, together, strict=True):
        assert both["cache"] == "miss" and one["seed"] == both["seed"]
        assert np.array_equal(pixels(one["data"][0]["b64_json"]), pixels(both["data"][0]["b64_json"]))
    assert not np.array_equal(
        pixels(together[0]["data"][0]["b64_json"]), pixels(together[1]["data"][0]["b64_json"])
    )


def test_body_limit_with_and_without_content_length(make_app, references):
    server, _ = serve(make_app, max_body_bytes=16_000)
    with server, httpx.Client(base_url=server.url, timeout=60) as http:
        big = http.post("/v1/images/generations", json=body("A" * 40_000))
        assert big.status_code == 413 and big.json()["error"]["type"] == "too_large"

        def chunks():
            for _ in range(40):
                yield b" " * 1000

        chunked = http.post("/v1/references", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert http.post("/v1/images/generations", json=body(references[0])).status_code == 200


def test_image_pixel_limit(make_app, references):
    from fastapi.testclient import TestClient

    app, _ = make_app(max_image_pixels=32 * 32)
    with TestClient(app) as http:
        refused = http.post("/v1/images/generations", json=body(references[0]))
        assert refused.status_code == 413 and "64x64" in refused.json()["error"]["message"]


def test_a_fault_is_a_logged_500_without_traceback(make_app, world, references, caplog):
    from fastapi.testclient import TestClient

    app, _ = make_app(GatedEngine(world, fail=RuntimeError("boom in the pipeline")))
    with TestClient(app) as http, caplog.at_level("ERROR", logger="idcraft.serve"):
        response = http.post("/v1/images/generations", json=body(references[0]))
        assert response.status_code == 500
        assert response.json() == {
            "error": {"message": "internal error; the server logged the details.", "type": "server_error"}
        }
        assert http.get("/healthz").status_code == 200
    assert "boom in the pipeline" in caplog.text


def test_graceful_shutdown_finishes_the_request_in_flight(make_app, world, references):
    gated = GatedEngine(world, gate=threading.Event())
    server, service = serve(make_app, gated)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(http.post, "/v1/images/generations", json=body(references[0]))
            wait_until(lambda: service.scheduler.running == 1)
            stopping = pool.submit(server.stop)
            wait_until(lambda: server.server.should_exit)
            time.sleep(0.2)
            gated.gate.set()
            answer = in_flight.result()
            stopping.result()
        assert answer.status_code == 200 and len(answer.json()["data"]) == 1
        assert not server.thread.is_alive()
        assert service.scheduler.closed
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/healthz", timeout=2)
    finally:
        gated.gate.set()
        server.stop()


def test_a_burst_admits_one_running_plus_the_queue_exactly():
    """Requests arriving in the same instant: one takes the free slot, queue_length wait, the rest 429."""
    import asyncio

    from idcraft.serve.errors import ApiError
    from idcraft.serve.scheduler import Deadline, Scheduler

    gate = threading.Event()

    async def main():
        scheduler = Scheduler(["cpu"], concurrency=1, queue_length=2)

        async def one(i):
            try:
                return await scheduler.run("cpu", lambda: gate.wait(10) and i, Deadline(30))
            except ApiError as exc:
                return exc.status

        tasks = [asyncio.ensure_future(one(i)) for i in range(10)]
        while scheduler.waiting + scheduler.running < 3 or sum(t.done() for t in tasks) < 7:
            await asyncio.sleep(0.01)
        refused = [t.result() for t in tasks if t.done()]
        gate.set()
        served = await asyncio.gather(*tasks)
        scheduler.close()
        return refused, served

    refused, served = asyncio.run(main())
    assert refused == [429] * 7
    assert sorted(s for s in served if s != 429) == [0, 1, 2]
