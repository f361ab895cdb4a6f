"""The server's work, independent of HTTP: a generation request in, the answer's JSON out.

:class:`Service` holds the loaded methods (:class:`~.catalog.Catalog`), the identity cache, the uploaded
references, the metrics and the load bounds (:class:`~.scheduler.Scheduler`), and turns an
:class:`~.schemas.ImageRequest` into a :class:`~idcraft.requests.GenerationRequest`: references resolved
(ids from ``POST /v1/references`` or inline base64), the method's defaults filled in, everything checked
by :meth:`Engine.prepare` before the request takes a place in the queue. In the worker thread, the
conditioning comes from the identity cache when the same references were encoded before with the same
encoding options (a hit: no encoder call), otherwise from :meth:`Engine.encode`, and is cached.

A request with no reference and no adapter method named is text-only (method ``none``: the base model
alone) where the catalog serves it. The answer's ``warnings`` carry what the server ignored (OpenAI's
``quality`` and ``style``; ``scale`` without a reference) and what the model cannot draw as asked (the
catalog's prompt check: the world's vocabulary).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from ..cancel import CancelToken, Progress
from ..errors import Cancelled, IdcraftError
from ..methods.text_only import TEXT_ONLY, is_text_only
from ..requests import GenerationRequest
from .cache import identity_key
from .catalog import Catalog, Served, lookup_method
from .config import ServeConfig
from .errors import ApiError, answer_for, bad_request, not_found, too_large
from .images import check_header, content_hash, decode, from_base64, to_png_base64, to_png_bytes
from .jobs import Job, JobStore, sse
from .metrics import Metrics
from .scheduler import Deadline, Scheduler, Ticket
from .schemas import ImageRequest
from .stages import StageInputs, given, read_stages
from .stores import Stores, open_stores
from .stores.fingerprint import catalog_fingerprints

log = logging.getLogger("idcraft.serve")

REFERENCE_ID = re.compile(r"[0-9a-f]{64}")
HEX = re.compile(r"[0-9a-fA-F]+")
ID_LIKE = re.compile(r"[0-9A-Za-z_-]+")
#: Base64 of the smallest image file is longer than this: a shorter item is meant as an id.
SHORTEST_IMAGE_B64 = 80


def reference_id(item: str) -> str | None:
    """The (lower-case) reference id ``item`` is meant as, or ``None`` for inline image data. Hex digits
    only, or a short word of letters and digits (too short to be an image), is an id: a mistyped,
    upper-case or expired id is then "no such reference", never a base64 or not-an-image error."""
    if not isinstance(item, str) or item.startswith("data:"):
        return None
    text = item.strip()
    if HEX.fullmatch(text) or (len(text) < SHORTEST_IMAGE_B64 and ID_LIKE.fullmatch(text)):
        return text.lower()
    return None


SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


@dataclass
class Work:
    """An admitted request: what runs, when it arrived, its deadline and place (slot or queue)."""

    served: Served
    request: GenerationRequest
    #: the identity cache's key of its references; ``None`` for text-only, which has none
    key: str | None
    arrived: float
    deadline: Deadline
    ticket: Ticket | None
    steps: int
    #: warnings about the request itself (fields ignored, words the model does not know)
    notes: list[str]


@dataclass
class Example:
    id: str
    name: str
    png: bytes


class Service:
    """Everything one server holds (see the module docstring). ``start()`` inside the event loop that
    will serve requests, ``close()`` at shutdown."""

    def __init__(self, config: ServeConfig, catalog: Catalog, stores: Stores | None = None):
        self.config = config
        self.catalog = catalog
        server = config.server
        # references and identity cache on the configured store (memory, a folder, Redis): see .stores
        self.stores = stores if stores is not None else open_stores(server)
        self.cache = self.stores.identities
        self.references = self.stores.references
        self.fingerprints = catalog_fingerprints(config, catalog)
        self.metrics = Metrics()
        self.scheduler: Scheduler | None = None
        self.token = os.environ.get(server.auth_token_env) or None
        self.examples: list[Example] = []
        self.jobs = JobStore(server.jobs_kept, server.job_ttl_s)
        #: When the first stop signal came (``time.monotonic``); ``None`` while serving.
        self.stopping_since: float | None = None
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
        self.metrics.counter(
            "identity_cache_shared_hits_total",
            "Identity cache hits answered by the shared store (another replica's or an earlier run's encoding).",
            lambda: self.cache.shared_hits,
        )
        self.metrics.counter(
            "store_errors_total",
            "Failed reads or writes of the store, by store (the identity cache goes on without it).",
            lambda: {
                'store="references"': self.references.health.errors,
                'store="identity"': self.cache.health.errors,
            },
        )
        self.metrics.gauge("jobs_active", "Jobs queued or running.", lambda: len(self.jobs.active()))

    def _scheduler_value(self, name: str) -> int:
        return getattr(self.scheduler, name) if self.scheduler is not None else 0

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        server = self.config.server
        self.scheduler = Scheduler(
            self.catalog.devices, concurrency=server.concurrency_per_device, queue_length=server.queue_length
        )
        self.scheduler.on_queue_change = self._queue_moved
        if not self.examples:
            self.examples = self._load_examples()

    def _queue_moved(self) -> None:
        for job in self.jobs.active():
            job.moved()

    def begin_shutdown(self) -> None:
        """The first stop signal: refuse new work (503) from now; work admitted may finish within the
        grace period (``server.shutdown_grace_s``)."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
        if self.scheduler is not None:
            self.scheduler.closed = True

    def cancel_all(self, reason: str = "the server is shutting down") -> None:
        """Stop everything admitted: queued jobs leave the queue, running work stops at its next step."""
        if self.scheduler is not None:
            self.scheduler.cancel_all(reason)
        for job in self.jobs.active():
            job.cancel.cancel(reason)
            if job.state == "queued" and job.task is not None:
                job.task.cancel()

    async def aclose(self) -> None:
        """At shutdown: jobs still queued or running get what is left of the grace period, then
        everything still admitted is cancelled and the worker threads are waited for (each stops within
        a step)."""
        self.begin_shutdown()
        grace = self.config.server.shutdown_grace_s
        left = grace - (time.monotonic() - (self.stopping_since or time.monotonic()))
        tasks = {job.task for job in self.jobs.active() if job.task is not None}
        if tasks and left > 0:
            await asyncio.wait(tasks, timeout=left)
        self.cancel_all()
        if tasks:  # each stops at its next step and records its end
            await asyncio.wait(tasks, timeout=60)
        await asyncio.to_thread(self.close)

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
        if not await asyncio.to_thread(self.references.put, digest, data):  # a folder or Redis: I/O
            raise too_large(f"the reference is {len(data):,} bytes, more than this server keeps.")
        return {"id": digest, "object": "reference", "bytes": len(data), "width": width, "height": height}

    def _item_bytes(self, item: str, what: str) -> bytes:
        """The bytes of one image item of the body: an upload's id (as for references) or base64 data."""
        id_ = reference_id(item)
        return self._reference_bytes(id_, what) if id_ is not None else from_base64(item, what)

    def _reference_bytes(self, id_: str, what: str) -> bytes:
        data = self.references.get(id_) if REFERENCE_ID.fullmatch(id_) else None
        if data is None:
            kept = "in memory" if self.stores.kind == "memory" else f"in {self.stores.location}"
            raise not_found(
                f"{what}: no such reference {id_!r} here (ids are the 64 hex digits POST "
                f"/v1/references answers; uploads are kept {kept} and the oldest are dropped: upload it again)."
            )
        return data

    # ------------------------------------------------------------------ generation
    async def generate(self, body: ImageRequest, *, cancel: CancelToken | None = None) -> dict[str, Any]:
        """``POST /v1/images/generations``: admitted, run, answered; ``cancel`` stops it at the next step
        (the route cancels it when the client disconnects)."""
        work = await self._admit(body, self.config.server.request_timeout_s)
        return await self._execute(work, cancel)

    async def _admit(self, body: ImageRequest, timeout_s: float) -> Work:
        """Everything a request needs checked before it takes a place: the body, the references, the
        method's options; then a slot or a place in the queue (429 when full)."""
        arrived = time.monotonic()
        server = self.config.server
        deadline = Deadline(timeout_s)
        if body.response_format != "b64_json":
            raise bad_request(
                f"response_format {body.response_format!r} is not supported: this server returns images inline, "
                "use b64_json."
            )
        name = body.method or body.model
        text_only = (
            not body.references
            and not given(body)
            and self.catalog.text_only
            and (name is None or is_text_only(name))
        )
        served = self.catalog.get(TEXT_ONLY.name if text_only else name)
        if body.identitynet_scale is not None and not lookup_method(served.method).identitynet:
            raise bad_request(
                f"identitynet_scale: not used by {served.method} (InstantID's IdentityNet only)."
            )
        notes = self._notes(body, served)
        if text_only and body.scale is not None:
            body = body.model_copy(update={"scale": None})
        width, height = parse_size(body.size)
        served.check_size(width, height)
        ids = [reference_id(r) for r in body.references]

        def resolve() -> list[bytes]:
            return [self._item_bytes(item, f"references[{i}]") for i, item in enumerate(body.references)]

        # a folder or Redis store reads off the event loop
        uploaded = any(id_ is not None for id_ in ids)
        refs = await asyncio.to_thread(resolve) if self.stores.kind != "memory" and uploaded else resolve()
        stages = StageInputs()
        if given(body):  # small images, decoded and checked off the event loop (and uploads read there)
            stages = await asyncio.to_thread(read_stages, body, self._item_bytes, server.max_image_pixels)
        request = self._request(body, served, width, height, refs, stages)
        _, prepared = served.engine.prepare(request)  # bad input is refused here, before it takes a place
        if text_only:
            return self._place(
                Work(served, request, None, arrived, deadline, None, prepared.steps or 0, notes)
            )
        if not refs and not stages:
            raise bad_request(
                f"{served.method} needs at least one reference: base64 images, or ids from POST /v1/references."
            )

        def hash_and_check() -> list[str]:
            for i, (data, id_) in enumerate(zip(refs, ids, strict=True)):
                if id_ is None:
                    check_header(data, server.max_image_pixels, f"references[{i}]")
            return [content_hash(data) for data in refs]

        hashes = await asyncio.to_thread(hash_and_check)
        key = identity_key(
            served.method,
            hashes,
            s_scale=request.s_scale,
            face_index=request.face_index,
            multi_person=request.multi_person,
            models=self.fingerprints.get(served.method, ""),
            stages=stages.hashes,
        )
        return self._place(Work(served, request, key, arrived, deadline, None, prepared.steps or 0, notes))

    def _place(self, work: Work) -> Work:
        """A slot for ``work`` on its method's device, or a place in the queue (429 when full)."""
        assert self.scheduler is not None, "Service.start() was not called"
        work.ticket = self.scheduler.admit(work.served.device)
        return work

    async def _execute(
        self,
        work: Work,
        cancel: CancelToken | None,
        progress: Progress | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        assert self.scheduler is not None, "Service.start() was not called"
        cancel = cancel or CancelToken()
        outcome = await self.scheduler.execute(
            work.ticket, lambda: self._run(work, cancel, progress), work.deadline, cancel, on_start
        )
        total = time.monotonic() - work.arrived
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
            "warnings": [*work.notes, *result.warnings],
            "cache": None if hit is None else "hit" if hit else "miss",
            "settings": result.settings,
        }

    # ------------------------------------------------------------------ jobs
    async def submit_job(self, body: ImageRequest) -> dict[str, Any]:
        """``POST /v1/jobs``: admitted now (same checks, queue and 429 as a generation), run after the
        answer; the job's JSON."""
        work = await self._admit(body, self.config.server.job_timeout_s)
        job = self.jobs.create(work.steps)
        if work.ticket.holds_slot:
            job.state = "running"
        else:
            scheduler = self.scheduler
            job.position = lambda: scheduler.position(work.ticket) if scheduler is not None else None
        job.task = asyncio.create_task(self._run_job(job, work), name=job.id)
        return job.describe()

    async def _run_job(self, job: Job, work: Work) -> None:
        loop = asyncio.get_running_loop()

        def progress(step: int, total: int) -> None:  # in the worker thread
            try:
                loop.call_soon_threadsafe(job.progress, step, total)
            except RuntimeError:  # the loop is gone (forced shutdown): no one is watching
                pass

        try:
            result = await self._execute(work, job.cancel, progress, on_start=job.started)
        except asyncio.CancelledError:
            job.finish("cancelled", error=_cancelled_error(job.cancel.reason or "cancelled"))
        except Cancelled as exc:
            job.finish("cancelled", error=_cancelled_error(str(exc)))
        except Exception as exc:  # the job's failure is its answer, as a generation's would be
            answer = answer_for(exc)
            if answer.status >= 500 and not isinstance(exc, ApiError):
                log.error("job %s failed: %s: %s", job.id, type(exc).__name__, exc, exc_info=exc)
            self.metrics.error(answer.kind, answer.status)
            job.finish("failed", error={"type": answer.kind, "message": answer.message})
        else:
            job.finish("succeeded", result=result)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.jobs.get(job_id).describe()

    async def cancel_job(self, job_id: str, wait_s: float = 10.0) -> dict[str, Any]:
        """``DELETE /v1/jobs/{id}``: a queued job leaves the queue; a running one stops at its next step
        (waited for up to ``wait_s``). A finished job is left as it is."""
        job = self.jobs.get(job_id)
        if not job.done:
            job.cancel.cancel("cancelled by DELETE /v1/jobs")
            if job.state == "queued" and job.task is not None:
                job.task.cancel()
            if job.task is not None:
                await asyncio.wait({job.task}, timeout=wait_s)
        return job.describe()

    async def job_events(self, job_id: str, keepalive_s: float = 15.0) -> AsyncIterator[str]:
        """Server-sent events of a job: ``progress`` (the job's JSON) at once and at every change, ``done``
        (the final JSON) at the end; a comment every ``keepalive_s`` keeps proxies from closing it."""
        job = self.jobs.get(job_id)
        while True:
            version = job.version
            if job.done:
                yield sse("done", json.dumps(job.describe()))
                return
            yield sse("progress", json.dumps(job.describe()))
            while not await job.changed(version, keepalive_s):
                yield ": keep-alive\n\n"

    def _request(
        self,
        body: ImageRequest,
        served: Served,
        width,
        height,
        refs: list[bytes],
        stages: StageInputs | None = None,
    ) -> GenerationRequest:
        stages = stages or StageInputs()
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
            controlnet_scales=None if body.identitynet_scale is None else [body.identitynet_scale],
            infusenet_start=body.infusenet_start,
            infusenet_end=body.infusenet_end,
            start_step=body.start_step,
            num_zero=body.num_zero if body.num_zero is not None else defaults.get("num_zero"),
            ortho=body.ortho if body.ortho is not None else defaults.get("ortho"),
            sampler=body.sampler if body.sampler is not None else defaults.get("sampler"),
            face_embeddings=stages.face_embeddings,
            aligned_faces=stages.aligned_faces,
            face_parsings=stages.face_parsings,
        )

    def _notes(self, body: ImageRequest, served: Served) -> list[str]:
        """Warnings about the request itself: fields accepted and ignored, words the model does not know."""
        notes = []
        if body.quality is not None:
            notes.append(
                f"quality {body.quality!r} is ignored: idcraft has no quality setting (steps and guidance set "
                "the sampling)."
            )
        if body.style is not None:
            notes.append(
                f"style {body.style!r} is ignored: idcraft has no style setting (say it in the prompt)."
            )
        if served.method == TEXT_ONLY.name and body.scale is not None:
            notes.append("scale is ignored: no reference was given, so no adapter acts (method none).")
        if self.catalog.prompt_check is not None:
            notes.extend(self.catalog.prompt_check(body.prompt))
        return notes

    def _run(self, work: Work, cancel: CancelToken, progress: Progress | None):
        """In a worker thread, holding a slot on the method's device."""
        served, request, key, deadline = work.served, work.request, work.key, work.deadline
        started = time.monotonic()
        deadline.check("waiting in the queue")
        cancel.check()
        engine = served.engine
        if key is None:  # text-only: nothing to encode or cache
            result = engine.generate(request, cancel=cancel, progress=progress)
            timings = {
                "queue_s": started - work.arrived,
                "encode_s": 0.0,
                "generate_s": result.timings.get("generate_s", 0.0),
            }
            return result, [to_png_base64(image) for image in result.images], None, timings
        conditioning, tier = self.cache.lookup(key, served.device)
        hit = tier is not None
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
        encoded = replace(
            request,
            references=(),
            face_embeddings=None,
            aligned_faces=None,
            face_parsings=None,
            conditioning=conditioning,
        )  # everything the encoders read is in the conditioning
        result = engine.generate(encoded, cancel=cancel, progress=progress)
        pngs = [to_png_base64(image) for image in result.images]
        timings = {
            "queue_s": started - work.arrived,
            "encode_s": encode_s,
            "generate_s": result.timings.get("generate_s", 0.0),
        }
        return result, pngs, hit, timings

    # ------------------------------------------------------------------ descriptions
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._describe(served) for served in self.catalog]}

    def model(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``: one model object (an alias finds its method); 404 for one not served."""
        try:
            served = self.catalog.get(model_id)
        except IdcraftError:
            raise not_found(
                f"no model {model_id!r} here; this server serves {', '.join(self.catalog.methods)}."
            ) from None
        return self._describe(served)

    def _describe(self, served: Served) -> dict[str, Any]:
        out = served.describe()
        if self.catalog.vocabulary is not None:
            out["vocabulary"] = self.catalog.vocabulary
        return out

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
            "store": self.stores.kind,
        }

    def readiness(self) -> dict[str, Any]:
        """``/readyz``: models loaded and serving, and the store reachable (one round trip to it)."""
        scheduler = self.scheduler
        serving = scheduler is not None and not scheduler.closed
        store = self.stores.check()
        ready = serving and bool(store["reachable"])
        return {"status": "ready" if ready else "not ready", "models": serving, "store": store}

    def example_list(self) -> dict[str, Any]:
        import base64

        out: dict[str, Any] = {
            "object": "list",
            "data": [
                {"id": e.id, "name": e.name, "b64_json": base64.b64encode(e.png).decode("ascii")}
                for e in self.examples
            ],
        }
        if self.catalog.vocabulary is not None:
            out["vocabulary"] = self.catalog.vocabulary
            out["prompts"] = list(self.catalog.vocabulary.get("examples", []))
        return out


def _cancelled_error(reason: str) -> dict[str, str]:
    return {"type": "cancelled", "message": reason}


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"WxH"`` -> (W, H); ``None`` -> the method's default."""
    if size is None or size == "auto":
        return None, None
    match = SIZE.fullmatch(size)
    if not match:
        raise bad_request(f"size must be WIDTHxHEIGHT in pixels, such as 512x512; got {size!r}.")
    return int(match.group(1)), int(match.group(2))
