"""The server's counters, written in the Prometheus text format (``GET /metrics``) by hand: no
dependency, and the few series a dashboard needs.

Series (all prefixed ``idcraft_``): ``queue_depth`` and ``in_flight`` (gauges), ``requests_total`` by
endpoint and status, ``request_duration_seconds`` (histogram, by endpoint), ``generation_seconds``
(histogram of whole generations), ``identity_cache_hits_total`` / ``_misses_total`` / ``_entries`` /
``_bytes``, ``encode_seconds_total`` and ``encode_calls_total`` (time in the image encoder and face
analysis; a cache hit adds none), ``generate_seconds_total``, ``errors_total`` by type and status.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

#: Histogram bucket bounds, seconds.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}'
            for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {_num(self.sum)}", f"{name}_count{suffix} {self.total}"]
        return out


class Metrics:
    """Thread-safe counters; gauges are read at scrape time from ``gauges`` callables."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.durations: dict[str, Histogram] = defaultdict(Histogram)
        self.generation = Histogram()
        self.errors: dict[tuple[str, int], int] = defaultdict(int)
        self.cache_hits = 0
        self.cache_misses = 0
        self.encode_seconds = 0.0
        self.encode_calls = 0
        self.generate_seconds = 0.0
        self.images = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float | dict[str, float]]]] = {}

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.durations[endpoint].observe(seconds)

    def error(self, kind: str, status: int) -> None:
        with self._lock:
            self.errors[(kind, status)] += 1

    def cache(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.cache_hits += 1
            else:
                self.cache_misses += 1

    def encoded(self, seconds: float) -> None:
        with self._lock:
            self.encode_calls += 1
            self.encode_seconds += seconds

    def generated(self, seconds: float, total: float, images: int) -> None:
        with self._lock:
            self.generate_seconds += seconds
            self.images += images
            self.generation.observe(total)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def counter(self, name: str, help_text: str, read: Callable[[], float | dict[str, float]]) -> None:
        """A counter kept elsewhere, read at scrape time: a number, or values by label text
        (``{'store="identity"': 3}``)."""
        self.counters[name] = (help_text, read)

    def render(self) -> str:
        """Everything, in the Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            out: list[str] = []
            for name, (help_text, read) in self.gauges.items():
                out += _head(name, help_text, "gauge") + [f"idcraft_{name} {_num(read())}"]
            for name, (help_text, read) in self.counters.items():
                value = read()
                out += _head(name, help_text, "counter")
                if isinstance(value, dict):
                    out += [f"idcraft_{name}{{{labels}}} {_num(v)}" for labels, v in value.items()]
                else:
                    out.append(f"idcraft_{name} {_num(value)}")
            out += _head("requests_total", "HTTP requests answered, by endpoint and status.", "counter")
            out += [
                f'idcraft_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())
            ]
            out += _head(
                "request_duration_seconds", "Seconds from request to answer, by endpoint.", "histogram"
            )
            for endpoint, hist in sorted(self.durations.items()):
                out += hist.lines("idcraft_request_duration_seconds", f'endpoint="{endpoint}"')
            out += _head(
                "generation_seconds", "Seconds of successful generations, queue wait included.", "histogram"
            )
            out += self.generation.lines("idcraft_generation_seconds")
            for name, help_text, value in (
                (
                    "identity_cache_hits_total",
                    "Requests whose conditioning came from the identity cache.",
                    self.cache_hits,
                ),
                ("identity_cache_misses_total", "Requests whose references were encoded.", self.cache_misses),
                (
                    "encode_seconds_total",
                    "Seconds in the image encoder and face analysis.",
                    self.encode_seconds,
                ),
                (
                    "encode_calls_total",
                    "Calls of the image encoder / face analysis (cache misses).",
                    self.encode_calls,
                ),
                ("generate_seconds_total", "Seconds in the diffusion pipelines.", self.generate_seconds),
                ("images_total", "Images generated.", self.images),
            ):
                out += _head(name, help_text, "counter") + [f"idcraft_{name} {_num(value)}"]
            out += _head("errors_total", "Refused or failed requests, by error type and status.", "counter")
            out += [
                f'idcraft_errors_total{{type="{k}",status="{s}"}} {n}'
                for (k, s), n in sorted(self.errors.items())
            ]
        return "\n".join(out) + "\n"


def _head(name: str, help_text: str, kind: str) -> list[str]:
    return [f"# HELP idcraft_{name} {help_text}", f"# TYPE idcraft_{name} {kind}"]


def _num(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))
