"""Jobs on a real uvicorn server over the offline world: 202 at once, polling, server-sent events,
cancellation mid-run (stopping within a step, counted by the engine's own progress), queue positions;
and a synchronous generation whose client disconnects is cancelled and frees its slot."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from .conftest import GatedEngine, pixels
from .test_load import body, serve, wait_until

#: Enough steps that a run not cancelled would take many seconds.
LONG = 400


class CountingEngine:
    """The world engine, recording each step it reports and whether the call's token was cancelled then."""

    def __init__(self, engine):
        self._engine = engine
        self.steps: list[tuple[int, bool]] = []

    def generate(self, request, *, cancel=None, progress=None):
        def record(done: int, total: int) -> None:
            self.steps.append((done, cancel is not None and cancel.cancelled))
            if progress is not None:
                progress(done, total)

        return self._engine.generate(request, cancel=cancel, progress=record)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def finished(http: httpx.Client, job_id: str, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < end, job
        time.sleep(0.05)


def events(http: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    out, event = [], None
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[len("data: ") :])))
    return out


def test_job_lifecycle_polling_and_events(make_app, world, references):
    server, _ = serve(make_app)
    with server, httpx.Client(base_url=server.url, timeout=60) as http:
        created = http.post("/v1/jobs", json=body(references[0], steps=4))
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["id"].startswith("job_") and len(job["id"]) == 4 + 32 and job["object"] == "job"
        assert job["state"] in ("queued", "running") and job["result"] is None and job["error"] is None
        assert set(job) >= {"step", "total_steps", "queue_position", "created", "finished"}
        stream = events(http, job["id"])
        kinds = [kind for kind, _ in stream]
        assert kinds[-1] == "done" and set(kinds[:-1]) <= {"progress"}
        done = stream[-1][1]
        assert done["state"] == "succeeded" and done["step"] == done["total_steps"] == 4
        steps = [data["step"] for kind, data in stream if kind == "progress"]
        assert steps == sorted(steps)
        polled = http.get(f"/v1/jobs/{job['id']}").json()
        assert polled == done and polled["finished"] >= polled["created"]
        sync = http.post("/v1/images/generations", json=body(references[0], steps=4)).json()
        assert set(polled["result"]) == set(sync)  # exactly what a generation answers
        assert (pixels(polled["result"]["data"][0]["b64_json"]) == pixels(sync["data"][0]["b64_json"])).all()
        assert events(http, job["id"]) == [("done", polled)]  # a finished job: its end at once
        missing = http.get("/v1/jobs/job_" + "0" * 32)
        assert missing.status_code == 404 and "no such job" in missing.json()["error"]["message"]
        assert http.get("/v1/jobs/nope/events").status_code == 404
        bad = http.post("/v1/jobs", json=body(references[0], steps=0))
        assert bad.status_code == 400  # refused before it becomes a job


def test_cancelling_a_running_job_stops_it_within_a_step(make_app, world, references):
    counting = CountingEngine(world)
    server, service = serve(make_app, counting)
    with server, httpx.Client(base_url=server.url, timeout=60) as http:
        job = http.post("/v1/jobs", json=body(references[0], steps=LONG)).json()
        wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["step"] >= 2, timeout=60)
        cancelled = http.delete(f"/v1/jobs/{job['id']}").json()
        assert cancelled["state"] == "cancelled", cancelled
        assert cancelled["error"]["type"] == "cancelled" and cancelled["finished"] is not None
        assert cancelled["step"] < LONG
        after = [done for done, was_cancelled in counting.steps if was_cancelled]
        assert len(after) <= 1, counting.steps  # at most the step already under way when DELETE came
        wait_until(lambda: service.scheduler.running == 0, timeout=10)
        assert http.delete(f"/v1/jobs/{job['id']}").json() == finished(http, job["id"])  # idempotent
        again = http.post("/v1/jobs", json=body(references[1])).json()
        assert finished(http, again["id"])["state"] == "succeeded"  # the slot was freed


def test_queued_jobs_have_positions_share_the_queue_and_leave_it_on_delete(make_app, world, references):
    gated = GatedEngine(world, gate=threading.Event())
    server, service = serve(make_app, gated, queue_length=2)
    try:
        with server, httpx.Client(base_url=server.url, timeout=60) as http:
            first = http.post("/v1/jobs", json=body(references[0])).json()
            assert first["state"] == "running" and first["queue_position"] is None  # took the free slot
            second = http.post("/v1/jobs", json=body(references[1])).json()
            third = http.post("/v1/jobs", json=body(references[2])).json()
            assert (second["state"], second["queue_position"]) == ("queued", 1)
            assert (third["state"], third["queue_position"]) == ("queued", 2)
            full = http.post("/v1/jobs", json=body(references[2]))
            assert full.status_code == 429 and full.json()["error"]["type"] == "queue_full"
            with http.stream("GET", f"/v1/jobs/{third['id']}/events") as stream:
                lines = (line for line in stream.iter_lines() if line.startswith("data: "))
                assert json.loads(next(lines)[6:])["queue_position"] == 2
                gone = http.delete(f"/v1/jobs/{second['id']}").json()
                assert gone["state"] == "cancelled" and gone["queue_position"] is None
                assert json.loads(next(lines)[6:])["queue_position"] == 1  # the stream says it moved up
            assert http.get(f"/v1/jobs/{third['id']}").json()["queue_position"] == 1
            assert service.scheduler.waiting == 1
            gated.gate.set()
            assert finished(http, first["id"])["state"] == "succeeded"
            assert finished(http, third["id"])["state"] == "succeeded"
    finally:
        gated.gate.set()


def test_finished_jobs_are_kept_within_bounds(make_app, world, references):
    server, _ = serve(make_app, jobs_kept=1)
    with server, httpx.Client(base_url=server.url, timeout=60) as http:
        ids = [http.post("/v1/jobs", json=body(references[0])).json()["id"] for _ in range(2)]
        for job_id in ids:  # one slot: they finish in order
            finished(http, job_id)
        assert http.get(f"/v1/jobs/{ids[1]}").status_code == 200
        assert http.get(f"/v1/jobs/{ids[0]}").status_code == 404  # the older one was dropped


def test_a_disconnected_client_frees_the_slot(make_app, world, references):
    counting = CountingEngine(world)
    server, service = serve(make_app, counting)
    with server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/images/generations", json=body(references[0], steps=LONG), timeout=2)
        wait_until(lambda: service.scheduler.running == 0, timeout=15)
        assert max(done for done, _ in counting.steps) < LONG  # it stopped, it did not run out
        assert len([1 for _, was_cancelled in counting.steps if was_cancelled]) <= 1
        answer = httpx.post(server.url + "/v1/images/generations", json=body(references[1]), timeout=60)
        assert answer.status_code == 200 and len(answer.json()["data"]) == 1


def test_the_jobs_page_config_parses():
    import re
    from pathlib import Path

    import yaml

    from idcraft.serve.config import config_from_dict

    page = Path(__file__).resolve().parents[2] / "docs" / "serve-jobs.md"
    block = re.search(r"```yaml\n(server:.*?)```", page.read_text(), re.DOTALL)
    assert block, "the config example is missing from docs/serve-jobs.md"
    server = config_from_dict(yaml.safe_load(block.group(1))).server
    assert (server.job_timeout_s, server.jobs_kept, server.body_timeout_s) == (3600, 256, 30)


def test_shutdown_cancels_a_job_still_running_after_the_grace_period(make_app, world, references):
    counting = CountingEngine(world)
    server, service = serve(make_app, counting, shutdown_grace_s=1.0)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            job = http.post("/v1/jobs", json=body(references[0], steps=LONG)).json()
            wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["step"] >= 1, timeout=60)
        started = time.monotonic()
        server.stop()
        assert not server.thread.is_alive() and time.monotonic() - started < 20
        ended = service.jobs.get(job["id"])
        assert ended.state == "cancelled" and "shutting down" in ended.error["message"]
        assert ended.step < LONG
    finally:
        server.stop()


def test_a_timed_out_generation_stops_and_frees_the_slot(make_app, world, references):
    counting = CountingEngine(world)
    server, service = serve(make_app, counting, request_timeout_s=3.0)
    with server, httpx.Client(base_url=server.url, timeout=60) as http:
        slow = http.post("/v1/images/generations", json=body(references[0], steps=LONG))
        assert slow.status_code == 504 and slow.json()["error"]["type"] == "timeout"
        wait_until(lambda: service.scheduler.running == 0, timeout=15)
        assert max((done for done, _ in counting.steps), default=0) < LONG
        assert len([1 for _, was_cancelled in counting.steps if was_cancelled]) <= 1
        service.config.server.request_timeout_s = 60
        assert http.post("/v1/images/generations", json=body(references[1])).status_code == 200
