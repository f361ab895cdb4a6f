"""``idcraft serve`` as a user starts it: a subprocess on a free port serving the offline world with no
config, answering a generation, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from .conftest import STEPS


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_idcraft_serve_starts_answers_and_stops_on_sigterm(references):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "IDCRAFT_API_TOKEN"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    process = subprocess.Popen(
        [sys.executable, "-m", "idcraft", "serve", "--port", str(port), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "idcraft serve did not come up in 120 s"
            time.sleep(0.2)
        body = {"prompt": "a portrait", "references": [references[0]], "steps": STEPS, "seed": 1}
        answer = httpx.post(url + "/v1/images/generations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["method"] == "ip-adapter"
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: killed by SIGTERM, cleanly
        assert process.wait(60) in (0, -signal.SIGTERM)
        output = process.stdout.read()
        assert f"on http://127.0.0.1:{port}/" in output and "Traceback" not in output
        assert "Application shutdown complete" in output, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def start_serve(port: int, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "IDCRAFT_API_TOKEN"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    return subprocess.Popen(
        [sys.executable, "-m", "idcraft", "serve", "--port", str(port), "--device", "cpu", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def wait_healthy(process: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "idcraft serve did not come up"
        time.sleep(0.2)


def test_a_second_sigterm_stops_a_busy_server_at_once(references):
    import threading

    port = free_port()
    process = start_serve(port)
    url = f"http://127.0.0.1:{port}"
    answers: list = []
    try:
        wait_healthy(process, url)
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
        deadline = time.monotonic() + 60
        while httpx.get(url + "/healthz", timeout=5).json()["queue"]["waiting"] < 1:
            assert time.monotonic() < deadline, "the generation never queued behind the job"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        seconds = time.monotonic() - stopped
        client.join(30)
        output = process.stdout.read()
        assert code in (0, -signal.SIGTERM), output
        assert seconds < 15, f"took {seconds:.1f} s after the second SIGTERM"
        assert "Traceback" not in output, output
        # the waiting client was not left hanging: an error answer or a closed connection
        assert answers and (isinstance(answers[0], Exception) or answers[0].status_code >= 500)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
