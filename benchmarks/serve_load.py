"""Load on ``idcraft serve``: N concurrent clients x M requests against a local server on the offline
world, then a burst against a short queue.

    python benchmarks/serve_load.py                          # 8 clients x 6 requests, 4 steps, 4 references
    python benchmarks/serve_load.py --clients 16 --requests 10 --concurrency 2
    python benchmarks/serve_load.py --url http://host:8000   # a server already running (phase 1 only)
    python benchmarks/serve_load.py --replicas 1,2           # Ray Serve: 1 then 2 replicas on one Redis

Phase 1 ("steady"): every client sends its requests one after another, references drawn in turn from a
few world characters (uploaded once with POST /v1/references), a new seed each time; the server has a
queue long enough for all clients. Checked: every request answered 200, none lost (each client gets one
answer per request); reported: p50/p95/max latency, throughput, the identity cache's hit rate (answers
and /metrics), and seconds in the encoder.

Phase 2 ("queue full"): a server with a queue of 2 gets a burst of simultaneous requests; the ones
beyond one running + two waiting are refused with 429 and Retry-After; the server stays alive
(/healthz during and after) and answers again once the burst has drained.

The server runs in this process (a uvicorn thread), so client threads share its CPUs: on a small machine
the numbers include the clients' own cost.

``--replicas 1,2`` (needs ``pip install 'idcraft[ray]'`` and a ``redis-server`` on PATH, or ``--store``):
phase 1 against ``idcraft serve --ray`` with each replica count in turn, in this run, on a local Ray
cluster with the replicas on CPU (``--gpus-per-replica`` on a GPU machine) sharing one Redis (a fresh
database per count, so each starts cold). Reported per count: throughput, p50/p95, the cache hit rate
across replicas (an upload is encoded once on the first replica that sees it, then a hit on every other),
and how many requests each replica answered.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def upload_references(http, count: int) -> list[str]:
    import base64
    import io

    from idcraft.world.generate import reference_image
    from idcraft.world.identity import held_out_ids

    ids = []
    for identity in held_out_ids()[:count]:
        buffer = io.BytesIO()
        reference_image(identity).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        answer = http.post("/v1/references", json={"image": image})
        answer.raise_for_status()
        ids.append(answer.json()["id"])
    return ids


def steady(url: str, args, headers: dict) -> dict:
    import httpx

    with httpx.Client(base_url=url, timeout=600, headers=headers) as http:
        refs = upload_references(http, args.references)
        before = http.get("/metrics").text
    latencies: list[float] = []
    statuses: list[int] = []
    caches: list[str] = []
    replicas: dict[str, int] = {}
    lock = threading.Lock()

    def client(index: int) -> int:
        answered = 0
        with httpx.Client(base_url=url, timeout=600, headers=headers) as http:
            for j in range(args.requests):
                body = {
                    "prompt": "a large creature standing in the centre on a beach",
                    "method": args.method,
                    "references": [refs[(index + j) % len(refs)]],
                    "steps": args.steps,
                    "seed": index * 1000 + j,
                }
                start = time.perf_counter()
                answer = http.post("/v1/images/generations", json=body)
                took = time.perf_counter() - start
                with lock:
                    statuses.append(answer.status_code)
                    latencies.append(took)
                    if answer.status_code == 200:
                        caches.append(answer.json()["cache"])
                        name = answer.headers.get("x-idcraft-replica", "local")
                        replicas[name] = replicas.get(name, 0) + 1
                answered += 1
        return answered

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        answered = sum(pool.map(client, range(args.clients)))
    wall = time.perf_counter() - start
    with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
        after = http.get("/metrics").text
    hits = metric(after, "idcraft_identity_cache_hits_total") - metric(
        before, "idcraft_identity_cache_hits_total"
    )
    misses = metric(after, "idcraft_identity_cache_misses_total") - metric(
        before, "idcraft_identity_cache_misses_total"
    )
    encode = metric(after, "idcraft_encode_seconds_total") - metric(before, "idcraft_encode_seconds_total")
    return {
        "sent": args.clients * args.requests,
        "answered": answered,
        "ok": statuses.count(200),
        "other": len(statuses) - statuses.count(200),
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "max": max(latencies),
        "mean": statistics.fmean(latencies),
        "wall": wall,
        "throughput": statuses.count(200) / wall,
        "hit_rate": caches.count("hit") / max(1, len(caches)),
        "hit_rate_metrics": hits / max(1, hits + misses),
        "encode_s": encode,
        "replicas": replicas,
    }


def burst(url: str, args, headers: dict, service=None) -> dict:
    import httpx

    with httpx.Client(base_url=url, timeout=600, headers=headers) as http:
        refs = upload_references(http, 1)
    gate = threading.Barrier(args.burst)
    statuses: list[int] = []
    retry_after: list[int] = []
    alive: list[int] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        body = {
            "prompt": "a portrait",
            "method": args.method,
            "references": refs,
            "steps": args.steps,
            "seed": index,
        }
        with httpx.Client(base_url=url, timeout=600, headers=headers) as http:
            gate.wait()
            answer = http.post("/v1/images/generations", json=body)
            with lock:
                statuses.append(answer.status_code)
                if answer.status_code == 429:
                    retry_after.append(int(answer.headers.get("Retry-After", "0")))
                if index == 0:  # asks while the burst is being served
                    alive.append(http.get("/healthz").status_code)

    start = time.perf_counter()
    with ThreadPoolExecutor(args.burst) as pool:
        list(pool.map(one, range(args.burst)))
    wall = time.perf_counter() - start
    with httpx.Client(base_url=url, timeout=600, headers=headers) as http:
        alive.append(http.get("/healthz").status_code)
        body = {"prompt": "after", "method": args.method, "references": refs, "steps": args.steps, "seed": 1}
        after = http.post("/v1/images/generations", json=body).status_code
    return {
        "sent": args.burst,
        "answered": len(statuses),
        "ok": statuses.count(200),
        "refused_429": statuses.count(429),
        "other": len(statuses) - statuses.count(200) - statuses.count(429),
        "retry_after": (min(retry_after), max(retry_after)) if retry_after else None,
        "healthz": alive,
        "after": after,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6, help="requests per client")
    parser.add_argument("--references", type=int, default=4, help="distinct world references")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--method", default="ip-adapter")
    parser.add_argument("--concurrency", type=int, default=1, help="generations at once per device")
    parser.add_argument("--burst", type=int, default=24, help="simultaneous requests of phase 2")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--url", help="a running server (phase 1 only); default: start one here")
    parser.add_argument("--token", default=os.environ.get("IDCRAFT_API_TOKEN"))
    parser.add_argument("--replicas", help="Ray Serve replica counts to compare, such as 1,2")
    parser.add_argument("--store", help="with --replicas: a Redis URL (default: a redis-server started here)")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}

    import torch

    torch.set_num_threads(args.threads)
    if args.url:
        print(table(steady(args.url, args, headers), None, args))
        return
    if args.replicas:
        print(replicas_table(ray_runs(args), args))
        return

    from idcraft.serve.app import create_app
    from idcraft.serve.catalog import world_catalog
    from idcraft.serve.config import ServeConfig, ServerConfig
    from idcraft.serve.server import BackgroundServer
    from idcraft.world.generate import world_engine

    os.environ.pop("IDCRAFT_API_TOKEN", None)
    headers = {}
    started = time.perf_counter()
    engine = world_engine(device="cpu")
    print(f"world engine loaded in {time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs")

    def server(**settings) -> BackgroundServer:
        config = ServeConfig(server=ServerConfig(concurrency_per_device=args.concurrency, **settings))
        return BackgroundServer(create_app(config, world_catalog(config, engine)), config)

    with server(queue_length=max(16, args.clients)) as running:
        first = steady(running.url, args, headers)
    with server(queue_length=2) as running:
        second = burst(running.url, args, headers)
    print(table(first, second, args))


def table(first: dict, second: dict | None, args) -> str:
    lines = [
        f"steady: {args.clients} clients x {args.requests} requests, {args.method}, {args.steps} steps, "
        f"{args.references} references, concurrency {args.concurrency} per device",
        "",
        "| phase | sent | answered | 200 | 429 | other | p50 s | p95 s | max s | throughput img/s | cache hit rate | encoder s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| steady | {first['sent']} | {first['answered']} | {first['ok']} | 0 | {first['other']} | "
        f"{first['p50']:.2f} | {first['p95']:.2f} | {first['max']:.2f} | {first['throughput']:.2f} | "
        f"{first['hit_rate']:.0%} (metrics {first['hit_rate_metrics']:.0%}) | {first['encode_s']:.2f} |",
    ]
    if second is not None:
        lines.append(
            f"| queue full (burst {second['sent']}, queue 2) | {second['sent']} | {second['answered']} | "
            f"{second['ok']} | {second['refused_429']} | {second['other']} | - | - | {second['wall']:.2f} (burst wall) | - | - | - |"
        )
        lines += [
            "",
            f"queue full: Retry-After {second['retry_after']} s; /healthz during and after: {second['healthz']}; "
            f"a request after the burst: {second['after']}",
        ]
    return "\n".join(lines)


def ray_runs(args) -> list[tuple[int, dict]]:
    """Phase 1 against a Ray Serve deployment of each replica count in ``args.replicas``."""
    import shutil
    import socket
    import subprocess
    import tempfile
    from urllib.parse import urlsplit

    import ray
    from ray import serve

    from idcraft.serve.config import RayConfig, ServeConfig, ServerConfig
    from idcraft.serve.ray_app import build

    counts = [int(n) for n in args.replicas.split(",")]
    redis_process = None
    store = args.store
    if store is None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit(
                "--replicas needs a Redis: install redis-server or pass --store redis://host:port"
            )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            redis_port = probe.getsockname()[1]
        redis_process = subprocess.Popen(
            [binary, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            cwd=tempfile.mkdtemp(),
            stdout=subprocess.DEVNULL,
        )
        store = f"redis://127.0.0.1:{redis_port}"
        time.sleep(0.5)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), RAY_USAGE_STATS_ENABLED="0")
    ray.init(include_dashboard=False, log_to_driver=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        for db, count in enumerate(counts, start=1):
            config = ServeConfig(
                server=ServerConfig(
                    store=urlsplit(store)._replace(path=f"/{db}").geturl(),  # a fresh database: cold
                    concurrency_per_device=args.concurrency,
                    queue_length=max(16, args.clients),
                ),
                ray=RayConfig(replicas=count, num_gpus=args.gpus_per_replica, num_cpus=0.1),
            )
            config.world.device = "cpu" if args.gpus_per_replica == 0 else "auto"
            config.world.examples = 0
            started = time.perf_counter()
            serve.run(build(config), name="idcraft", route_prefix="/")
            print(f"{count} replica(s) ready in {time.perf_counter() - started:.1f} s", flush=True)
            results.append((count, steady(url, args, {})))
            serve.delete("idcraft")
    finally:
        serve.shutdown()
        ray.shutdown()
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait()
    return results


def replicas_table(results: list[tuple[int, dict]], args) -> str:
    lines = [
        f"Ray Serve on one Redis: {args.clients} clients x {args.requests} requests, {args.method}, "
        f"{args.steps} steps, {args.references} references, {os.cpu_count()} CPUs",
        "",
        "| replicas | 200 / sent | p50 s | p95 s | throughput img/s | cache hit rate | answered per replica |",
        "|---|---|---|---|---|---|---|",
    ]
    for count, run in results:
        per_replica = ", ".join(str(n) for n in sorted(run["replicas"].values(), reverse=True))
        lines.append(
            f"| {count} | {run['ok']} / {run['sent']} | {run['p50']:.2f} | {run['p95']:.2f} | "
            f"{run['throughput']:.2f} | {run['hit_rate']:.0%} | {per_replica} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
