"""``idcraft serve`` as a user starts it: a subprocess on a free port serving the offline world with no
config, answering a generation, and stopping cleanly on SIGTERM (once when idle, twice when busy).

Both tests' servers start together in one module fixture: each loads the world in its own process, and
the two loads overlap instead of running one after the other (the start-up is most of these tests' time).
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from .conftest import STEPS
from .processes import ServeProcess, serve_process, wait_for


@pytest.fixture(scope="module")
def servers():
    """Two fresh ``idcraft serve`` processes (no config, no token), started at once; each test stops one.
    One torch thread each: two processes of two threads on two cores spin-wait on each other (measured
    on a busy two-core machine: both ready in 24 s at one thread each, 28-50 s at two)."""
    with serve_process(threads=1) as idle, serve_process(threads=1) as busy:
        yield {"idle": idle, "busy": busy}


def test_idcraft_serve_starts_answers_and_stops_on_sigterm(servers, references):
    server: ServeProcess = servers["idle"]
    server.wait_ready()
    body = {"prompt": "a portrait", "references": [references[0]], "steps": STEPS, "seed": 1}
    answer = httpx.post(server.url + "/v1/images/generations", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["method"] == "ip-adapter"
    server.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: killed by SIGTERM, cleanly
    assert server.process.wait(60) in (0, -signal.SIGTERM)
    output = server.output()
    assert f"on http://127.0.0.1:{server.port}/" in output and "Traceback" not in output
    assert "Application shutdown complete" in output, output


def test_a_second_sigterm_stops_a_busy_server_at_once(servers, references):
    server: ServeProcess = servers["busy"]
    url, process = server.url, server.process
    answers: list = []
    server.wait_ready()
    job = httpx.post(url + "/v1/jobs", json={"prompt": "x", "references": [references[1]], "steps": 400})
    assert job.status_code == 202, job.text
    long = {"prompt": "a portrait", "references": [references[0]], "steps": 400, "seed": 1}

    def post() -> None:
        try:
            answers.append(httpx.post(url + "/v1/images/generations", json=long, timeout=120))
        except httpx.TransportError as exc:
            answers.append(exc)

    client = threading.Thread(target=post)
    client.start()
    wait_for(
        lambda: httpx.get(url + "/healthz", timeout=5).json()["queue"]["waiting"] >= 1,
        60,
        "the generation never queued behind the job",
    )
    process.send_signal(signal.SIGTERM)
    # the first SIGTERM is being handled (graceful shutdown begun: no new connections) before the second
    wait_for(lambda: _refuses(url), 10, "the server kept accepting after the first SIGTERM")
    stopped = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(30)
    seconds = time.monotonic() - stopped
    client.join(30)
    output = server.output()
    assert code in (0, -signal.SIGTERM), output
    assert seconds < 15, f"took {seconds:.1f} s after the second SIGTERM"
    assert "Traceback" not in output, output
    # the waiting client was not left hanging: an error answer or a closed connection
    assert answers and (isinstance(answers[0], Exception) or answers[0].status_code >= 500)


def _refuses(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=1)
    except httpx.TransportError:
        return True
    return False
