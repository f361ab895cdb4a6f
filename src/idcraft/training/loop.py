"""The generic training loop: data, optimizer, accelerate, checkpoints, logs; the method is a recipe.

One call, :func:`train`, runs a whole job from a :class:`~idcraft.training.config.TrainConfig`, on one
process or many. Scale-out is accelerate's: start the same command once per GPU with its launcher (DDP; the
launcher's ``--mixed_precision`` or ``accelerate config`` apply unless ``--mixed-precision`` is given)::

    accelerate launch --multi_gpu --num_processes 8 -m idcraft train \\
        --method ip-adapter-plus --base ./stable-diffusion-v1-5 --image-encoder ./image_encoder \\
        --data ./data.jsonl --output ./runs/plus --mixed-precision fp16 --cache-features

``--batch-size`` is per process; the global batch is ``batch size x processes x accumulation``. Three ways
to spread a run, all chosen by accelerate's own configuration (``accelerate config`` / ``--config_file``):

* DDP (``--multi_gpu``): everything replicated; the adapter is small, the frozen base fits one GPU.
* FSDP, version 2 (``fsdp_version: 2``): the prepared model, frozen base included, sharded across processes
  (what makes FLUX-sized bases fit). FSDP1 is refused: it cannot hold frozen and trainable tensors in one
  flat parameter without ``use_orig_params``, and accelerate and torch are retiring it.
* DeepSpeed ZeRO stages 0-2: optimizer state (and gradients) partitioned. The DeepSpeed config's
  ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps`` and ``gradient_clipping`` must be
  ``auto`` or equal this run's ``--batch-size``, ``--gradient-accumulation``, ``--max-grad-norm``. ZeRO-3
  is refused (the recipes read adapter parameters outside the engine's gathering hooks).

Checkpoints hold the same files under every backend (the full trainable tensors, gathered; RNG and data
position per process), plus the optimizer state the backend's own way: accelerate's FSDP optimizer
checkpoint (``optimizer_0/``, sharded, or ``optimizer.bin``), DeepSpeed's ``deepspeed/`` checkpoint
(frozen parameters excluded). Only the main process writes the final adapter files. A run resumes under
the backend and process count it was written with.

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
import shutil
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
from .config import TrainConfig, check_resumable, check_same_run
from .data import BatchStream, DataPosition, Record, SampleLoader, SkipReport, data_fingerprint, list_records
from .recipe import TrainingRecipe, canonical_method, exports_state, model_state_keys, recipe_for
from .reporting import Reporter

log = logging.getLogger(__name__)

STATE_VERSION = 1

#: How a run is spread over processes (recorded in checkpoints; a resume must use the same).
PLAIN, FSDP2, DEEPSPEED = "ddp", "fsdp2", "deepspeed"
#: Under DeepSpeed, the engine's own checkpoint inside ours (folder, tag).
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"


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
    backend: str = PLAIN
    #: DeepSpeed: trainable key -> the keys of the same tensor in the model's state dict
    model_keys: dict[str, list[str]] | None = None
    position: DataPosition = field(default_factory=DataPosition)
    step: int = 0
    samples: int = 0
    elapsed: float = 0.0
    #: the last gathered trainable state (step, tensors), reused when the end follows a checkpoint
    gathered: tuple[int, dict] | None = None


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
        # Only the launcher's first process locks (and cleans) the run folder; the others share its lock.
        with ckpt.run_lock(config.output_dir, enabled=_first_process()):
            return self._run(recipe_cls)

    def _run(self, recipe_cls: type[TrainingRecipe]) -> TrainResult:
        config = self.config
        output = config.output_dir
        config.data_fingerprint = data_fingerprint(config.data)
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
        backend = _backend(accelerator, config)
        precision = accelerator.mixed_precision
        if precision == "fp16" and accelerator.device.type == "cpu":
            # accelerate autocasts float16 only on accelerators: on the CPU the trainable float32 layers
            # would meet the float16 base unconverted and the first step would fail deep inside a model.
            raise IdcraftError(
                "--mixed-precision fp16 needs a GPU; on the CPU use --mixed-precision bf16 (or leave it out)."
            )
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
        if backend != PLAIN and not exports_state(recipe):
            raise IdcraftError(
                f"{type(recipe).__name__}.export takes no state= argument, so its result cannot be written "
                f"from gathered tensors under {backend}; train it under DDP."
            )
        if resume_from is not None:
            self._check_resume(resume_from, accelerator.num_processes, backend)
            # Before accelerate wraps (and FSDP shards, DeepSpeed flattens) the parameters.
            recipe.load_trainable_state_dict(_load_safetensors(resume_from / "trainable.safetensors"))
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
        model_keys = None
        if backend == DEEPSPEED:
            model_keys = model_state_keys(recipe)  # by identity: before the engine flattens the parameters
            _configure_deepspeed(accelerator, config)
        model, optimizer = accelerator.prepare(recipe.model, optimizer)
        generator = ckpt.training_generator(config.seed, accelerator.process_index)
        return _Run(
            accelerator,
            recipe,
            model,
            optimizer,
            lr_scheduler,
            stream,
            records,
            report,
            total,
            generator,
            backend,
            model_keys,
        )

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import InitProcessGroupKwargs

        # Unset: what `accelerate launch --mixed_precision` / `accelerate config` put in the environment.
        # Passed explicitly, so that a run never inherits another in-process run's setting.
        precision = self.config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        options: dict[str, Any] = {"mixed_precision": precision, "cpu": self.config.cpu}
        if _deepspeed_requested() and not torch.cuda.is_available():
            # Without a GPU accelerate names no backend for DeepSpeed and counts one process per process;
            # DeepSpeed's CPU accelerator talks gloo, so say so (a CPU-only DeepSpeed run, as the tests do).
            options["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        try:
            return Accelerator(**options)
        except ValueError as exc:
            if "already been initialized" not in str(exc):
                raise
            # A second run in the same process (a notebook, tests) with other precision settings:
            # accelerate keeps its state process-wide; reset it (the process group, if any, stays).
            AcceleratorState._reset_state()
            return Accelerator(**options)

    def _resume_point(self, output: Path) -> Path | None:
        """The checkpoint to continue from (``--resume``: the newest one that is complete, falling back
        past corrupt or truncated ones, after checking it belongs to this method, base and data), or
        ``None`` for a fresh run, which never silently replaces an earlier run's checkpoints or finished
        adapter (``--overwrite`` deletes them first)."""
        config = self.config
        dirs = ckpt.checkpoint_dirs(output)
        finished = [p.name for p in (output / "adapter.safetensors", output / "adapter.bin") if p.is_file()]
        speak = _first_process()
        if config.resume:
            if config.overwrite:
                raise IdcraftError(
                    "--resume continues the run in --output and --overwrite replaces it; give only one."
                )
            chosen, problems = None, []
            for folder in reversed(dirs):
                problem = ckpt.checkpoint_problem(folder)
                if problem is None:
                    chosen = folder
                    break
                problems.append(f"{folder.name}: {problem}")
                if speak:
                    log.warning(
                        "--resume: checkpoint %s is corrupt or truncated (%s); falling back to the one before it.",
                        folder,
                        problem,
                    )
            if chosen is None:
                if problems:
                    raise IdcraftError(
                        f"--resume: no usable checkpoint in {output}; every one is corrupt or truncated ("
                        + "; ".join(problems)
                        + "). Pass --overwrite instead of --resume to train again from the start."
                    )
                if finished:
                    raise IdcraftError(
                        f"--resume: {output} holds a finished run ({finished[0]}) but no checkpoint to continue "
                        "from; pass --overwrite instead of --resume to train it again from the start, or choose "
                        "another --output."
                    )
                if speak:
                    log.warning("--resume: no checkpoint in %s; starting from the beginning.", output)
                return None
            saved = ckpt.read_json(chosen / "state.json")
            check_same_run(saved.get("config", {}), config)
            if speak:
                log.warning("--resume: continuing from step %d (%s).", int(saved["step"]), chosen)
            return chosen
        if dirs or finished:
            what = (
                f"checkpoints of an earlier run ({dirs[-1].name})"
                if dirs
                else f"a finished run ({finished[0]})"
            )
            if not config.overwrite:
                raise IdcraftError(
                    f"{output} holds {what}; pass --resume to continue it, --overwrite to replace it, or "
                    "choose another --output."
                )
            if speak:
                log.warning("--overwrite: deleting %s in %s.", what, output)
                shutil.rmtree(ckpt.checkpoint_root(output), ignore_errors=True)
                for name in finished:
                    (output / name).unlink(missing_ok=True)
        return None

    def _check_resume(self, folder: Path, world: int, backend: str) -> None:
        saved = ckpt.read_json(folder / "state.json")
        check_resumable(saved["config"], self.config)
        if saved["world"] != world:
            raise IdcraftError(
                f"cannot resume: the checkpoint was written by {saved['world']} processes and this run "
                f"has {world}; the data split (and so the result) depends on it. "
                f"Launch with {saved['world']}."
            )
        written = saved.get("backend", PLAIN)
        if written != backend:
            raise IdcraftError(
                f"cannot resume: the checkpoint was written under {written} and this run is {backend}; its "
                f"optimizer state is stored the {written} way. Launch with the same accelerate configuration."
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
            last = micro == accum - 1
            if run.backend == DEEPSPEED:
                # The engine accumulates itself: it divides by its gradient_accumulation_steps (= accum, see
                # _configure_deepspeed) and reduces and steps at the boundary we mark.
                loss = run.recipe.loss(run.model, batch, run.generator)
                accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last)
                losses.append(loss.detach())
                continue
            sync = contextlib.nullcontext() if last else accelerator.no_sync(run.model)
            with sync:  # DDP/FSDP reduce gradients on the last micro-batch only
                loss = run.recipe.loss(run.model, batch, run.generator)
                accelerator.backward(loss / accum)
            losses.append(loss.detach())
        if self.config.max_grad_norm and run.backend != DEEPSPEED:  # DeepSpeed clips in its step
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
    def _trainable_state(self, run: _Run) -> dict[str, torch.Tensor]:
        """The full trainable tensors, on the main process (``{}`` on the others). Under FSDP2 each sharded
        trainable parameter is all-gathered (only those: gathering the frozen base as well, as
        ``get_state_dict`` does, would move a FLUX-sized model to one process's RAM at every checkpoint);
        under DeepSpeed they come out of ``accelerator.get_state_dict``. Collective: every process calls
        it."""
        if run.gathered is not None and run.gathered[0] == run.step:
            return run.gathered[1]
        main = run.accelerator.is_main_process
        if run.backend == FSDP2:
            from torch.distributed.tensor import DTensor

            state = {}
            for key, value in run.recipe.trainable_state_dict().items():
                full = value.full_tensor() if isinstance(value, DTensor) else value
                if main:
                    state[key] = full.detach().cpu().contiguous()
        elif run.backend == DEEPSPEED:
            model_state = run.accelerator.get_state_dict(run.model)
            state = {}
            if main:
                for key, names in (run.model_keys or {}).items():
                    name = next((n for n in names if n in model_state), None)
                    if name is None:
                        raise IdcraftError(f"DeepSpeed's state dict has no {names[0]} (trainable {key}).")
                    state[key] = model_state[name].detach().cpu().contiguous()
        else:  # replicated: the main process's own tensors are the full ones
            trainable = run.recipe.trainable_state_dict().items() if main else ()
            state = {k: v.detach().cpu().contiguous() for k, v in trainable}
        run.gathered = (run.step, state)
        return state

    def _save(self, run: _Run) -> None:
        from ..outputs import save_safetensors

        config, accelerator, recipe = self.config, run.accelerator, run.recipe
        trainable = self._trainable_state(run)

        def write_all(folder: Path) -> None:
            """The backend's own optimizer checkpoint, written by every process."""
            if run.backend == FSDP2:
                from accelerate.utils import save_fsdp_optimizer

                save_fsdp_optimizer(
                    accelerator.state.fsdp_plugin, accelerator, run.optimizer, run.model, folder
                )
            elif run.backend == DEEPSPEED:
                run.model.save_checkpoint(
                    str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True
                )

        def write_main(folder: Path) -> None:
            save_safetensors(trainable, str(folder / "trainable.safetensors"))
            if run.backend == PLAIN:  # the live modules; recipes from before sharded training take no state
                recipe.export(folder, ("safetensors",), {"step": str(run.step)})
                torch.save(run.optimizer.state_dict(), folder / "optimizer.pt")
            else:
                recipe.export(folder, ("safetensors",), {"step": str(run.step)}, state=trainable)
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
                    "backend": run.backend,
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
            write_all=write_all,
            rank_state=rank_state,
            keep=config.keep_checkpoints,
            # the weights twice (resume copy, official export) and Adam's two moments: a checkpoint's size
            size_hint=4 * sum(t.numel() * t.element_size() for t in trainable.values()),
        )

    def _restore(self, run: _Run, folder: Path) -> None:
        """Everything but the trainable weights (loaded before ``prepare``, in :meth:`_setup`)."""
        accelerator = run.accelerator
        saved = ckpt.read_json(folder / "state.json")
        run.step, run.samples, run.elapsed = saved["step"], saved["samples"], saved["elapsed"]
        if run.backend == FSDP2:
            from accelerate.utils import load_fsdp_optimizer

            load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, run.optimizer, run.model, folder)
        elif run.backend == DEEPSPEED:
            path, _ = run.model.load_checkpoint(
                str(folder / DEEPSPEED_DIR),
                tag=DEEPSPEED_TAG,
                load_module_strict=False,  # frozen parameters are not in it
                load_optimizer_states=True,
                load_lr_scheduler_states=False,  # ours, saved beside it
            )
            if path is None:
                raise IdcraftError(
                    f"{folder}: no DeepSpeed checkpoint in {DEEPSPEED_DIR}/; it is incomplete."
                )
        else:
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
        if run.backend == FSDP2:
            return  # refused at set-up (_backend); the sharded base cannot run on one process
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
            from ..outputs import atomic_save_image

            folder = config.output_dir / "samples"
            for i, image in enumerate(images):
                atomic_save_image(image, folder / f"step-{run.step:08d}-{i}.png", overwrite=True)
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
        metadata = {"step": str(run.step)}
        state = self._trainable_state(run) if run.backend != PLAIN else None  # collective
        if accelerator.is_main_process:
            try:
                if state is None:
                    files = run.recipe.export(output, self.config.formats, metadata)
                else:
                    files = run.recipe.export(output, self.config.formats, metadata, state=state)
            except (OSError, RuntimeError) as exc:
                problem = ckpt.write_problem(exc, output)
                if problem is None:
                    raise
                raise ckpt.export_write_error(problem, output, ckpt.latest_checkpoint(output)) from exc
            report.write(output / "skipped.txt")
            if report.skipped or report.empty_captions:
                reporter.message(
                    f"{len(report.skipped)} sample(s) skipped, {len(report.empty_captions)} trained "
                    f"with an empty caption; see {output / 'skipped.txt'}"
                )
        accelerator.wait_for_everyone()
        return files


def _first_process() -> bool:
    """Whether this is the launcher's first process (or the only one); known before accelerate starts."""
    return int(os.environ.get("RANK", "0")) == 0


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _backend(accelerator, config: TrainConfig) -> str:
    """Which of :data:`PLAIN`, :data:`FSDP2`, :data:`DEEPSPEED` this run is, refusing what cannot work with
    a message saying what to change (see the module docstring)."""
    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise IdcraftError(
            f"the launcher started {launched} processes but accelerate counts {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}): each would train alone and overwrite the others' "
            "files. On a machine without GPUs pass --cpu (DDP over gloo); accelerate's FSDP needs GPUs."
        )
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise IdcraftError(
                "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config (FSDP2 keeps "
                "frozen and trainable parameters apart; FSDP1 needs use_orig_params and is being retired)."
            )
        if config.sample_every:
            raise IdcraftError(
                "--sample-every is not available under FSDP: the base model is sharded across processes and "
                "the main process alone cannot generate with it. Generate from a checkpoint's "
                "adapter.safetensors instead."
            )
        return FSDP2
    if kind == DistributedType.DEEPSPEED:
        stage = int(accelerator.state.deepspeed_plugin.zero_stage)
        if stage >= 3:
            raise IdcraftError(
                "DeepSpeed ZeRO-3 is not supported (the recipes read adapter weights outside DeepSpeed's "
                "gathering hooks); use ZeRO stage 1 or 2, or FSDP (fsdp_version: 2) to shard the base model."
            )
        return DEEPSPEED
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or _deepspeed_requested():
        log.warning(
            "the accelerate configuration asks for FSDP/DeepSpeed but accelerate runs %s here (accelerate's "
            "FSDP needs GPUs); training with plain data parallelism.",
            kind.value,
        )
    return PLAIN


def _configure_deepspeed(accelerator, config: TrainConfig) -> None:
    """Fill the DeepSpeed config's ``auto`` batch, accumulation and clipping entries from this run (the loop
    draws its own batches, so accelerate cannot read them off a dataloader), refusing contradictions."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": (config.batch_size, "--batch-size"),
        "gradient_accumulation_steps": (config.gradient_accumulation, "--gradient-accumulation"),
        "gradient_clipping": (float(config.max_grad_norm or 0.0), "--max-grad-norm"),  # 0: off
    }
    for key, (value, flag) in wanted.items():
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif float(current) != float(value):
            raise IdcraftError(
                f"the DeepSpeed config sets {key} = {current}, but this run has {flag} {value or 'unset'}; "
                f"make them equal or set {key} to auto."
            )
    # accelerate's own count, which it would otherwise find out of step with DeepSpeed's and warn about
    accelerator.gradient_accumulation_steps = config.gradient_accumulation


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: ``max_steps`` if set, else ``epochs`` worth of micro-batches."""
    return config.max_steps or max(
        1, math.floor(config.epochs * steps_per_epoch / config.gradient_accumulation)
    )
