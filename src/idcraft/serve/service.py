"""The server's work, independent of HTTP: a generation request in, the answer's JSON out.

:class:`Service` holds the loaded methods (:class:`~.catalog.Catalog`), the identity cache, the uploaded
references, the metrics and the load bounds (:class:`~.scheduler.Scheduler`), and turns an
:class:`~.schemas.ImageRequest` into a :class:`~idcraft.requests.GenerationRequest`: references resolved
(ids from ``POST /v1/references`` or inline base64), the method's defaults filled in, everything checked
by :meth:`Engine.prepare` before the request takes a place in the queue. In the worker thread, the
conditioning comes from the identity cache when the same references were encoded before with the same
encoding options (a hit: no encoder call), otherwise from :meth:`Engine.encode`, and is cached.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass, replace
from typing import Any

from ..requests import GenerationRequest
from .cache import LRUStore, identity_key
from .catalog import Catalog, Served
from .config import ServeConfig
from .errors import bad_request, not_found, too_large
from .images import check_header, content_hash, decode, from_base64, to_png_base64, to_png_bytes
from .metrics import Metrics
from .scheduler import Deadline, Scheduler
from .schemas import ImageRequest

log = logging.getLogger("idcraft.serve")

REFERENCE_ID = re.compile(r"[0-9a-f]{64}")
SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


@dataclass
class Example:
    id: str
    name: str
    png: bytes


class Service:
    """Everything one server holds (see the module docstring). ``start()`` inside the event loop that
    will serve requests, ``close()`` at shutdown."""

    def __init__(self, config: ServeConfig, catalog: Catalog):
        self.config = config
        self.catalog = catalog
        server = config.server
        self.cache = LRUStore(server.cache_entries, server.cache_bytes)
        self.references = LRUStore(server.reference_entries, server.reference_bytes)
        self.metrics = Metrics()
        self.scheduler: Scheduler | None = None
        self.token = os.environ.get(server.auth_token_env) or None
        self.examples: list[Example] = []
        self.metrics.gauge(
            "queue_depth", "Requests waiting for a device.", lambda: self._scheduler_value("waiting")
        )
        self.metrics.gauge(
            "in_flight",
            "Generations running (timed-out ones included until they end).",
            lambda: self._scheduler_value("running"),
        )
        self.metrics.gauge(
            "identity_cache_entries", "Conditionings in the identity cache.", lambda: len(self.cache)
        )
        self.metrics.gauge(
            "identity_cache_bytes", "Bytes of conditioning in the identity cache.", lambda: self.cache.bytes
        )
        self.metrics.gauge("references_stored", "Uploaded references kept.", lambda: len(self.references))

    def _scheduler_value(self, name: str) -> int:
        return getattr(self.scheduler, name) if self.scheduler is not None else 0

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        server = self.config.server
        self.scheduler = Scheduler(
            self.catalog.devices, concurrency=server.concurrency_per_device, queue_length=server.queue_length
        )
        if not self.examples:
            self.examples = self._load_examples()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    def _load_examples(self) -> list[Example]:
        out = []
        if self.catalog.world and self.config.world.examples > 0:
            from ..world.generate import reference_image
            from ..world.identity import held_out_ids

            for identity in held_out_ids()[: self.config.world.examples]:
                out.append(
                    Example("", f"world character {identity}", to_png_bytes(reference_image(identity)))
                )
        for path in self.config.server.examples:
            with open(path, "rb") as file:
                data = file.read()
            decode(data, self.config.server.max_image_pixels, str(path))
            out.append(Example("", os.path.basename(str(path)), data))
        for example in out:
            example.id = content_hash(example.png)
            self.references.put(example.id, example.png, pin=True)
        return out

    # ------------------------------------------------------------------ references
    async def add_reference(self, data: bytes) -> dict[str, Any]:
        """Check an uploaded reference (decoded in full, in a thread) and keep it under its content hash."""
        max_pixels = self.config.server.max_image_pixels

        def check() -> tuple[str, tuple[int, int]]:
            image = decode(data, max_pixels, "reference")
            return content_hash(data), image.size

        digest, (width, height) = await asyncio.to_thread(check)
        if not self.references.put(digest, data):
            raise too_large(f"the reference is {len(data):,} bytes, more than this server keeps.")
        return {"id": digest, "object": "reference", "bytes": len(data), "width": width, "height": height}

    def _reference_bytes(self, item: str, index: int) -> bytes:
        if REFERENCE_ID.fullmatch(item):
            data = self.references.get(item)
            if data is None:
                raise not_found(
                    f"references[{index}]: no reference with id {item} here (uploads are kept in memory and the "
                    "oldest are dropped: upload it again with POST /v1/references)."
                )
            return data
        return from_base64(item, f"references[{index}]")

    # ------------------------------------------------------------------ generation
    async def generate(self, body: ImageRequest) -> dict[str, Any]:
        arrived = time.monotonic()
        server = self.config.server
        deadline = Deadline(server.request_timeout_s)
        if body.response_format != "b64_json":
            raise bad_request(
                f"response_format {body.response_format!r} is not supported: this server returns images inline, "
                "use b64_json."
            )
        served = self.catalog.get(body.method or body.model)
        width, height = parse_size(body.size)
        uploaded = [REFERENCE_ID.fullmatch(r) is not None for r in body.references]
        refs = [self._reference_bytes(item, i) for i, item in enumerate(body.references)]
        request = self._request(body, served, width, height, refs)
        served.engine.prepare(request)  # bad input is refused here, before it takes a place in the queue
        if not refs:
            raise bad_request(
                f"{served.method} needs at least one reference: base64 images, or ids from POST /v1/references."
            )

        def hash_and_check() -> list[str]:
            for i, (data, known) in enumerate(zip(refs, uploaded, strict=True)):
                if not known:
                    check_header(data, server.max_image_pixels, f"references[{i}]")
            return [content_hash(data) for data in refs]

        hashes = await asyncio.to_thread(hash_and_check)
        key = identity_key(
            served.method,
            hashes,
            s_scale=request.s_scale,
            face_index=request.face_index,
            multi_person=request.multi_person,
        )
        assert self.scheduler is not None, "Service.start() was not called"
        outcome = await self.scheduler.run(
            served.device, lambda: self._run(served, request, key, arrived, deadline), deadline
        )
        total = time.monotonic() - arrived
        result, pngs, hit, timings = outcome
        timings["total_s"] = total
        self.metrics.generated(timings["generate_s"], total, len(pngs))
        first = result.images[0] if result.images else None
        return {
            "created": int(time.time()),
            "data": [{"b64_json": p} for p in pngs],
            "seed": result.seed,
            "method": result.method,
            "size": f"{first.width}x{first.height}" if first is not None else None,
            "timings": timings,
            "warnings": list(result.warnings),
            "cache": "hit" if hit else "miss",
            "settings": result.settings,
        }

    def _request(
        self, body: ImageRequest, served: Served, width, height, refs: list[bytes]
    ) -> GenerationRequest:
        defaults = served.defaults
        return GenerationRequest(
            prompt=body.prompt,
            method=served.method,
            references=tuple(refs),
            negative_prompt=body.negative_prompt
            if body.negative_prompt is not None
            else defaults.get("negative_prompt", ""),
            scale=body.scale if body.scale is not None else defaults.get("scale"),
            s_scale=body.s_scale if body.s_scale is not None else defaults.get("s_scale", 1.0),
            seed=body.seed,
            steps=body.steps if body.steps is not None else defaults.get("steps"),
            guidance=body.guidance if body.guidance is not None else defaults.get("guidance"),
            width=width if width is not None else defaults.get("width"),
            height=height if height is not None else defaults.get("height"),
            num_images=body.n,
            keypoints=body.keypoints,
            multi_person=body.multi_person,
            face_index=body.face_index,
            true_cfg=body.true_cfg,
            start_step=body.start_step,
            num_zero=body.num_zero if body.num_zero is not None else defaults.get("num_zero"),
            ortho=body.ortho if body.ortho is not None else defaults.get("ortho"),
            sampler=body.sampler if body.sampler is not None else defaults.get("sampler"),
        )

    def _run(self, served: Served, request: GenerationRequest, key: str, arrived: float, deadline: Deadline):
        """In a worker thread, holding a slot on the method's device."""
        started = time.monotonic()
        deadline.check("waiting in the queue")
        engine = served.engine
        conditioning = self.cache.get(key)
        hit = conditioning is not None
        encode_s = 0.0
        if conditioning is None:
            max_pixels = self.config.server.max_image_pixels
            images = [
                decode(data, max_pixels, f"references[{i}]") for i, data in enumerate(request.references)
            ]
            t0 = time.perf_counter()
            conditioning = engine.encode(replace(request, references=images))
            encode_s = time.perf_counter() - t0
            self.metrics.encoded(encode_s)
            self.cache.put(key, conditioning)
            deadline.check("encoding the references")
        self.metrics.cache(hit)
        result = engine.generate(replace(request, references=(), conditioning=conditioning))
        pngs = [to_png_base64(image) for image in result.images]
        timings = {
            "queue_s": started - arrived,
            "encode_s": encode_s,
            "generate_s": result.timings.get("generate_s", 0.0),
        }
        return result, pngs, hit, timings

    # ------------------------------------------------------------------ descriptions
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [served.describe() for served in self.catalog]}

    def health(self) -> dict[str, Any]:
        scheduler = self.scheduler
        return {
            "status": "ok" if scheduler is not None and not scheduler.closed else "stopping",
            "methods": list(self.catalog.methods),
            "world": self.catalog.world,
            "queue": {
                "waiting": self._scheduler_value("waiting"),
                "running": self._scheduler_value("running"),
                "queue_length": self.config.server.queue_length,
                "concurrency_per_device": self.config.server.concurrency_per_device,
                "devices": self.catalog.devices,
            },
            "cache": {"entries": len(self.cache), "bytes": self.cache.bytes},
        }

    def example_list(self) -> dict[str, Any]:
        import base64

        return {
            "object": "list",
            "data": [
                {"id": e.id, "name": e.name, "b64_json": base64.b64encode(e.png).decode("ascii")}
                for e in self.examples
            ],
        }


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"WxH"`` -> (W, H); ``None`` -> the method's default."""
    if size is None or size == "auto":
        return None, None
    match = SIZE.fullmatch(size)
    if not match:
        raise bad_request(f"size must be WIDTHxHEIGHT in pixels, such as 512x512; got {size!r}.")
    return int(match.group(1)), int(match.group(2))
