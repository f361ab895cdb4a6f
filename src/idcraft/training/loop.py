"""The generic training loop: data, optimizer, accelerate, checkpoints, logs; the method is a recipe.

One call, :func:`train`, runs a whole job from a :class:`~idcraft.training.config.TrainConfig`, on one
process or many. Scale-out is accelerate's: start the same command once per GPU with its launcher (DDP; the
launcher's ``--mixed_precision`` or ``accelerate config`` apply unless ``--mixed-precision`` is given)::

    accelerate launch --multi_gpu --num_processes 8 -m idcraft train \\
        --method ip-adapter-plus --base ./stable-diffusion-v1-5 --image-encoder ./image_encoder \\
        --data ./data.jsonl --output ./runs/plus --mixed-precision fp16 --cache-features

DDP is the supported backend (the adapter is small and replicated; the frozen base is replicated
too); FSDP and DeepSpeed are refused until sharded states are checkpointed. ``--batch-size`` is per
process; the global batch is ``batch size x processes x accumulation``.

Reproducibility is by construction: the data order is a function of ``(seed, epoch)``, every random
draw of the objective comes from one checkpointed CPU generator per process, and checkpoints hold the
optimizer, LR schedule, RNG states and data position. A run killed and resumed from a checkpoint ends
with the same weights, bit for bit on CPU, as a run that never stopped (tested; same machine, library
versions and thread count, since float sums depend on them; GPU kernels are not bit-deterministic).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import IdcraftError
from ..images import load_image
from . import state as ckpt
from .cache import FeatureCache
from .config import TrainConfig, check_resumable
from .data import BatchStream, DataPosition, Record, SampleLoader, SkipReport, list_records
from .recipe import TrainingRecipe, canonical_method, recipe_for
from .reporting import Reporter

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class StepInfo:
    """What callbacks see after each optimizer step."""

    step: int
    loss: float
    lr: float
    epoch: int
    trainer: Trainer


@dataclass
class TrainResult:
    """Outcome of :func:`train`: files written, steps done, the losses of this session's steps."""

    output: Path
    files: list[Path]
    step: int
    losses: list[float] = field(default_factory=list)
    skipped: SkipReport = field(default_factory=SkipReport)
    resumed_from: Path | None = None
    main_process: bool = True  # False on the other processes of a multi-process run (they write nothing)


Callback = Callable[[StepInfo], None]


def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``config.method`` as configured; see :class:`Trainer`."""
    return Trainer(config, callbacks).run()


@dataclass
class _Run:
    """The live objects of one run, passed between the loop's steps, checkpoints and the end."""

    accelerator: Any
    recipe: TrainingRecipe
    model: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    stream: BatchStream
    records: list[Record]
    report: SkipReport
    total: int
    generator: torch.Generator
    position: DataPosition = field(default_factory=DataPosition)
    step: int = 0
    samples: int = 0
    elapsed: float = 0.0


class Trainer:
    """Holds one run's parts; :meth:`run` does the work. After :meth:`run`, :attr:`recipe` holds the trained
    modules (tests inspect them)."""

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback] = ()):
        self.config = config
        self.callbacks = list(callbacks)
        self.recipe: TrainingRecipe | None = None

    def run(self) -> TrainResult:
        config = self.config
        recipe_cls = recipe_for(config.method)  # fail on an unknown method before loading anything
        config.method = canonical_method(config.method)
        output = config.output_dir
        resume_from = self._resume_point(output)
        if config.sample_every:  # fail now, not after hours of training
            if not config.sample_reference:
                raise IdcraftError(
                    "--sample-every needs --sample-reference (the image to generate previews of)."
                )
            load_image(config.sample_reference)
        run = self._setup(recipe_cls, resume_from)
        if resume_from is not None:
            self._restore(run, resume_from)
            log.info("resumed from %s (step %d)", resume_from, run.step)

        is_main = run.accelerator.is_main_process
        reporter = Reporter(
            output,
            enabled=is_main,
            start_step=run.step,
            total_steps=run.total,
            progress=config.progress,
            tensorboard=config.tensorboard,
        )
        losses: list[float] = []
        last_saved = run.step if resume_from is not None else None
        batches = self._batches(run.stream, run.position)
        try:
            while run.step < run.total:
                loss, lr, seconds = self._train_step(run, batches)
                losses.append(loss)
                per_step = config.batch_size * config.gradient_accumulation * run.accelerator.num_processes
                reporter.step(
                    run.step,
                    loss,
                    lr,
                    per_step / max(seconds, 1e-9),
                    run.elapsed,
                    log_row=run.step % config.log_every == 0 or run.step == run.total,
                )
                if run.step % config.checkpoint_every == 0:
                    self._save(run)
                    last_saved = run.step
                if config.sample_every and run.step % config.sample_every == 0:
                    self._sample(run, reporter)
                info = StepInfo(run.step, loss, lr, run.position.epoch, self)
                for callback in self.callbacks:
                    callback(info)
            if last_saved != run.step:
                self._save(run)  # so that --resume with a larger --max-steps continues this run
            files = self._finish(run, reporter)
        finally:
            reporter.close()
            batches.close()
        return TrainResult(output, files, run.step, losses, run.report, resume_from, is_main)

    # ------------------------------------------------------------------ set-up
    def _setup(self, recipe_cls: type[TrainingRecipe], resume_from: Path | None) -> _Run:
        """Accelerator, data list, recipe, feature cache, optimizer and schedule, all before step one."""
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        config = self.config
        accelerator = self.accelerator = self._accelerator()
        _check_backend(accelerator)
        precision = accelerator.mixed_precision
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        if accelerator.is_main_process:
            config.output_dir.mkdir(parents=True, exist_ok=True)
        records, report = list_records(config.data)
        if not records:
            raise IdcraftError(f"--data {config.data}: no usable samples ({len(report.skipped)} skipped).")

        set_seed(config.seed)
        recipe = self.recipe = recipe_cls(config)
        recipe.build(accelerator.device, weight_dtype)
        config.resolution = recipe.resolution
        if resume_from is not None:
            self._check_resume(resume_from, accelerator.num_processes)
        if accelerator.is_main_process:
            ckpt.write_json(config.output_dir / "config.json", config.to_dict())

        lookup = None
        if config.cache_features:
            records, lookup = self._cache_features(recipe, records, report)
        loader = SampleLoader(records, recipe.resolution, recipe.reference_preprocessor(), lookup)
        stream = BatchStream(
            loader,
            batch_size=config.batch_size,
            seed=config.seed,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            num_workers=config.num_workers,
        )

        optimizer = torch.optim.AdamW(
            recipe.trainable_parameters(),
            lr=config.learning_rate,
            betas=config.adam_betas,
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
        total = total_steps(config, stream.steps_per_epoch)
        # Stepped here once per optimizer step; not prepared, since accelerate's wrapper would step it
        # once per process.
        lr_scheduler = get_scheduler(
            config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total
        )
        model, optimizer = accelerator.prepare(recipe.model, optimizer)
        generator = ckpt.training_generator(config.seed, accelerator.process_index)
        return _Run(
            accelerator, recipe, model, optimizer, lr_scheduler, stream, records, report, total, generator
        )

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        # Unset: what `accelerate launch --mixed_precision` / `accelerate config` put in the environment.
        # Passed explicitly, so that a run never inherits another in-process run's setting.
        precision = self.config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        try:
            return Accelerator(mixed_precision=precision, cpu=self.config.cpu)
        except ValueError as exc:
            if "already been initialized" not in str(exc):
                raise
            # A second run in the same process (a notebook, tests) with other precision settings:
            # accelerate keeps its state process-wide; reset it (the process group, if any, stays).
            AcceleratorState._reset_state()
            return Accelerator(mixed_precision=precision, cpu=self.config.cpu)

    def _resume_point(self, output: Path) -> Path | None:
        latest = ckpt.latest_checkpoint(output)
        if self.config.resume:
            if latest is None:
                log.warning("--resume: no checkpoint in %s; starting from the beginning.", output)
            return latest
        if latest is not None:
            raise IdcraftError(
                f"{output} holds checkpoints of an earlier run ({latest.name}); pass --resume to "
                "continue it, or choose another --output."
            )
        return None

    def _check_resume(self, folder: Path, world: int) -> None:
        saved = ckpt.read_json(folder / "state.json")
        check_resumable(saved["config"], self.config)
        if saved["world"] != world:
            raise IdcraftError(
                f"cannot resume: the checkpoint was written by {saved['world']} processes and this run "
                f"has {world}; the data split (and so the result) depends on it. "
                f"Launch with {saved['world']}."
            )

    def _cache_features(self, recipe: TrainingRecipe, records: list[Record], report: SkipReport):
        fingerprint = recipe.cache_fingerprint()
        if fingerprint is None:
            raise IdcraftError(f"--cache-features is not supported by {self.config.method} training.")
        accelerator = self.accelerator
        cache = FeatureCache(self.config.feature_cache_dir, fingerprint)
        cache.prepare(accelerator.is_main_process)
        accelerator.wait_for_everyone()
        cache.build(
            records,
            recipe.reference_preprocessor(),
            recipe.encode_references,
            batch_size=self.config.cache_batch_size,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
        )
        accelerator.wait_for_everyone()
        kept, lookup = cache.load(records, report)
        if not kept:
            raise IdcraftError("no reference image could be encoded; see the skip report.")
        return kept, lookup

    # ------------------------------------------------------------------ one optimizer step
    @staticmethod
    def _batches(stream: BatchStream, position: DataPosition):
        while True:
            yield from stream.epoch(position)

    def _train_step(self, run: _Run, batches) -> tuple[float, float, float]:
        """Accumulate gradients over micro-batches, step; returns (mean loss over processes, lr, seconds)."""
        accum = self.config.gradient_accumulation
        accelerator = run.accelerator
        started = time.perf_counter()
        losses = []
        for micro in range(accum):
            batch = next(batches)
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(run.model)
            with sync:  # DDP all-reduces gradients on the last micro-batch only
                loss = run.recipe.loss(run.model, batch, run.generator)
                accelerator.backward(loss / accum)
            losses.append(loss.detach())
        if self.config.max_grad_norm:
            accelerator.clip_grad_norm_(run.recipe.trainable_parameters(), self.config.max_grad_norm)
        run.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no schedule advance
            run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.samples += self.config.batch_size * accum * accelerator.num_processes
        loss = accelerator.gather(torch.stack(losses).mean().reshape(1)).mean().item()
        seconds = time.perf_counter() - started
        run.elapsed += seconds
        return loss, run.lr_scheduler.get_last_lr()[0], seconds

    # ------------------------------------------------------------------ checkpoints
    def _save(self, run: _Run) -> None:
        from safetensors.torch import save_file

        config, accelerator, recipe = self.config, run.accelerator, run.recipe

        def write_main(folder: Path) -> None:
            trainable = {k: v.contiguous().cpu() for k, v in recipe.trainable_state_dict().items()}
            save_file(trainable, str(folder / "trainable.safetensors"))
            recipe.export(folder, ("safetensors",), {"step": str(run.step)})
            torch.save(run.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(run.lr_scheduler.state_dict(), folder / "lr_scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), folder / "grad_scaler.pt")
            ckpt.write_json(
                folder / "state.json",
                {
                    "version": STATE_VERSION,
                    "step": run.step,
                    "samples": run.samples,
                    "elapsed": run.elapsed,
                    "world": accelerator.num_processes,
                    "config": config.to_dict(),
                },
            )

        position = run.position
        rank_state = {
            "rng": ckpt.capture_rng(),
            "generator": run.generator.get_state(),
            "position": [position.epoch, position.step, position.cursor],
            "bad": dict(run.stream.bad),
        }
        ckpt.save(
            accelerator,
            config.output_dir,
            run.step,
            write_main=write_main,
            rank_state=rank_state,
            keep=config.keep_checkpoints,
        )

    def _restore(self, run: _Run, folder: Path) -> None:
        from safetensors.torch import load_file

        accelerator = run.accelerator
        saved = ckpt.read_json(folder / "state.json")
        run.step, run.samples, run.elapsed = saved["step"], saved["samples"], saved["elapsed"]
        run.recipe.load_trainable_state_dict(load_file(str(folder / "trainable.safetensors"), device="cpu"))
        run.optimizer.load_state_dict(ckpt.load_tensors(folder / "optimizer.pt"))
        run.lr_scheduler.load_state_dict(ckpt.load_tensors(folder / "lr_scheduler.pt"))
        if accelerator.scaler is not None and (folder / "grad_scaler.pt").is_file():
            accelerator.scaler.load_state_dict(ckpt.load_tensors(folder / "grad_scaler.pt"))
        rank_file = folder / f"rank-{accelerator.process_index}.pt"
        if not rank_file.is_file():
            raise IdcraftError(f"{folder}: no {rank_file.name}; the checkpoint is incomplete.")
        rank_state = ckpt.load_tensors(rank_file)
        ckpt.restore_rng(rank_state["rng"])
        run.generator.set_state(rank_state["generator"])
        run.position.epoch, run.position.step, run.position.cursor = (int(v) for v in rank_state["position"])
        run.stream.bad.update({int(k): str(v) for k, v in rank_state["bad"].items()})

    # ------------------------------------------------------------------ samples and the end
    def _sample(self, run: _Run, reporter: Reporter) -> None:
        config = self.config
        if run.accelerator.is_main_process:
            rng = ckpt.capture_rng()  # building the preview adapter draws from the global RNG
            try:
                images = run.recipe.sample(
                    config.sample_prompt,
                    config.sample_reference,
                    seed=config.sample_seed,
                    steps=config.sample_steps,
                    guidance=config.sample_guidance,
                )
            finally:
                ckpt.restore_rng(rng)
            folder = config.output_dir / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(folder / f"step-{run.step:08d}-{i}.png")
                reporter.image(f"samples/{i}", image, run.step)
        run.accelerator.wait_for_everyone()

    def _finish(self, run: _Run, reporter: Reporter) -> list[Path]:
        """Export the result, gather and write the skip report."""
        accelerator, output, report = run.accelerator, self.config.output_dir, run.report
        bad = [run.stream.bad]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            bad = gather_object(bad)
        for part in bad:
            for index, reason in part.items():
                report.skip(run.records[int(index)].image, reason)
        files: list[Path] = []
        if accelerator.is_main_process:
            files = run.recipe.export(output, self.config.formats, {"step": str(run.step)})
            report.write(output / "skipped.txt")
            if report.skipped or report.empty_captions:
                reporter.message(
                    f"{len(report.skipped)} sample(s) skipped, {len(report.empty_captions)} trained "
                    f"with an empty caption; see {output / 'skipped.txt'}"
                )
        accelerator.wait_for_everyone()
        return files


def _check_backend(accelerator) -> None:
    """DDP (and single-process) only, for now: under FSDP or DeepSpeed ZeRO the adapter's parameters and
    optimizer state are sharded, and the checkpoints and exports here would hold one shard. The trainable
    part is small (22-100M parameters), so replicating it with DDP costs little."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise IdcraftError(
            f"idcraft train runs under DDP (accelerate launch --multi_gpu), not {accelerator.distributed_type.value}: "
            "sharded adapter and optimizer states are not checkpointed yet."
        )


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: ``max_steps`` if set, else ``epochs`` worth of micro-batches."""
    return config.max_steps or max(
        1, math.floor(config.epochs * steps_per_epoch / config.gradient_accumulation)
    )
