"""``idcraft batch``: images and a manifest, per-job errors that do not stop the run, finished jobs skipped
on a re-run, and data parallelism: two CPU processes under torchrun make each job exactly once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from idcraft.batch import read_jobs, read_manifest
from idcraft.cli import main

from .conftest import PROMPTS


def _jobs(world, path: Path, count: int = 6, bad: bool = True) -> Path:
    alice, bob = world["refs"] / "alice.png", world["refs"] / "bob" / "1.png"
    lines = []
    for k in range(count):
        model = "ip-adapter" if k % 2 == 0 else "faceid"
        job = {
            "id": f"job{k}",
            "model": model,
            "prompt": PROMPTS[k % 2],
            "references": [str(alice if k % 3 else bob)],
        }
        job.update(steps=2, width=64, height=64, scale=0.5 + 0.1 * (k % 2))
        if model == "faceid":
            job["face_index"] = 0  # the tiny detector reads the bright square as many faces: the largest
        if k == 4:
            job["recipe"] = "lcm"
            job.pop("steps")  # the recipe's own steps (2 in models.yaml) and guidance
        lines.append(json.dumps(job))
    if bad:
        lines.append(
            json.dumps({"id": "missing", "model": "ip-adapter", "prompt": "x", "reference": "nope.png"})
        )
        lines.append(json.dumps({"id": "typo", "prompt": "x", "scael": 1}))
        lines.append("# a comment line")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_records_errors_and_skips_finished_jobs(tiny_world, tmp_path, counted, capsys):
    jobs = _jobs(tiny_world, tmp_path / "jobs.jsonl")
    out = tmp_path / "out"
    argv = ["batch", "--requests", str(jobs), "--config", str(tiny_world["config"]), "--output", str(out)]
    assert main([*argv, "--batch-size", "2"]) == 1  # some jobs failed: exit status 1, the rest done
    err = capsys.readouterr().err
    assert "missing" in err and "nope.png" in err and "unknown key(s) scael" in err
    records = read_manifest(out)
    assert len(records) == 8 and not list(out.glob("manifest.rank*.jsonl"))
    for k in range(6):
        record = records[f"job{k}"]
        assert record["error"] is None and record["images"] == [f"images/job{k}.png"]
        assert (out / record["images"][0]).is_file()
        assert record["seed"] == read_jobs(jobs)[k].seed and record["timings"]["generate_s"] > 0
    assert records["job4"]["settings"]["steps"] == 2 and records["job4"]["settings"]["guidance"] == 1.0
    assert records["job4"]["settings"]["fewstep"]["recipe"] == "lcm-lora"
    assert records["job0"]["settings"]["guidance"] == 7.5
    assert records["missing"]["error"] and records["typo"]["error"]
    # 5 plain jobs and 1 lcm job: 3 engines (ip-adapter, faceid, ip-adapter + lcm), 6 images made
    assert counted["loads"] == 3 and counted["requests"] == 6

    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [*(f"job{k}" for k in range(6)), "missing", "typo"]
    stamp = (out / "images" / "job0.png").stat().st_mtime_ns
    assert main(argv) == 1
    assert counted["loads"] == 4 and counted["requests"] == 6  # the failed job retried; nothing made again
    assert (out / "images" / "job0.png").stat().st_mtime_ns == stamp
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is needed for two-process runs",
)
def test_two_processes_make_each_job_once(tiny_world, tmp_path):
    jobs = _jobs(tiny_world, tmp_path / "jobs.jsonl", count=6, bad=False)
    out = tmp_path / "out"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    environment.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += ["-m", "idcraft", "batch", "--requests", str(jobs), "--config", str(tiny_world["config"])]
    command += ["--output", str(out), "--device", "cpu"]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "6 job(s): 6 done, 0 failed" in done.stdout and "2 process(es)" in done.stdout
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [f"job{k}" for k in range(6)]  # each job once, in order
    assert [r["rank"] for r in lines] == [k % 2 for k in range(6)]
    assert all(r["error"] is None and (out / r["images"][0]).is_file() for r in lines)
    assert not list(out.glob("manifest.rank*.jsonl")) and len(list((out / "images").iterdir())) == 6
