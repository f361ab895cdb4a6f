"""Rebuild every model of the world bundle, in order, and record how: ``idcraft world build``.

The order follows what depends on what: renders -> judge (scores only) -> VAE -> text encoder + UNet ->
the UNet trained further on the characters' detail -> the VAE decoder trained further (the latent space
stays, so the UNet is unaffected) -> CLIP vision tower -> identity models (the face-analysis role) ->
adapters, trained with :func:`idcraft.training.train` exactly as a user trains theirs, on a dataset
written in ``idcraft train``'s manifest format. Each stage's settings live in :data:`PROFILES` (``full``
made the shipped bundle; ``cpu`` is the same build at about half the steps, under two hours on two CPU
cores; ``reduced`` is a minutes-long version for tests), and ``BUILD.json`` records, per
stage, its settings, seed, wall time, device, machine and measurements (losses, held-out accuracies),
beside the command that ran.

A stage already recorded whose output exists is skipped, so an interrupted build continues where it stopped;
``force`` retrains the stages named.

On a GPU (profile ``h200``; docs/world-gpu.md) the trainers run their fast path, each stage may carry a
time cap (``max_seconds``), ``pack`` writes the finished models as float16 archives after every stage
(:mod:`.pack`: a run cut off early keeps what finished), ``keep_going`` records a failed stage and goes on
with the stages that do not need it, and ``BUILD.json`` keeps each run's command and log (``runs``).
``latent_channels`` (4, 8 or 16) overrides the VAE's; the UNet and every adapter follow the VAE.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import IdcraftError
from . import bundle
from .arrays import render_arrays
from .identity import held_out_ids

#: Stage names in build order.
STAGES: tuple[str, ...] = (
    "judge",
    "vae",
    "text_unet",
    "unet_detail",
    "decoder",
    "clip_vision",
    "identity",
    "ip-adapter",
    "ip-adapter-plus",
    "faceid",
    "instantid",
)
ADAPTER_STAGES = ("ip-adapter", "ip-adapter-plus", "faceid", "instantid")
#: What each stage trains on besides the renders: with ``keep_going``, a stage whose requirement failed in
#: this run (or has no output) is skipped rather than tried.
REQUIRES: dict[str, tuple[str, ...]] = {
    "text_unet": ("vae",),
    "unet_detail": ("text_unet",),
    "decoder": ("text_unet",),
    "ip-adapter": ("text_unet", "clip_vision"),
    "ip-adapter-plus": ("text_unet", "clip_vision"),
    "faceid": ("text_unet", "identity"),
    "instantid": ("text_unet", "identity"),
}
#: VAE latent channels a build may ask for.
LATENT_CHANNELS = (4, 8, 16)
#: Lines of a run's log kept in ``BUILD.json``.
LOG_LINES = 4000

#: Per profile: the renders (``samples``/``seed`` of the training arrays), then each stage's settings
#: (adapter stages: ``adapters``, updated by the method's own entry where there is one).
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "renders": {"samples": 40_000, "seed": 0},
        "judge": {"steps": 3000, "batch_size": 128, "learning_rate": 2e-3, "seed": 11, "samples": 20_000},
        "vae": {"steps": 2000, "batch_size": 32, "learning_rate": 1e-3, "seed": 12},
        "text_unet": {"steps": 4000, "batch_size": 64, "learning_rate": 5e-4, "seed": 13},
        "unet_detail": {"steps": 1500, "batch_size": 32, "learning_rate": 2e-4, "seed": 17},
        "decoder": {"steps": 1000, "batch_size": 32, "learning_rate": 5e-4, "seed": 16},
        "clip_vision": {"steps": 1500, "batch_size": 128, "learning_rate": 1e-3, "seed": 14},
        # crowd: further identities only the recogniser learns (idcraft.world.identity); the shipped
        # identity models predate it. 8000 lifted a linear probe of the held-out references' embeddings
        # (ears 0.28 -> 0.59, accessory 0.54 -> 0.69, shape 0.78 -> 0.95), but FaceID and InstantID must
        # be retrained on the new embedding before it can ship (README, "What this shows")
        "identity": {
            "steps": 3000,
            "batch_size": 128,
            "learning_rate": 2e-3,
            "seed": 15,
            "samples": 40_000,
            "crowd": 0,
        },
        "adapters": {
            "samples": 20_000,
            "seed": 3,
            "max_steps": 1200,
            "batch_size": 32,
            "learning_rate": 1e-3,
            "lora_rank": 16,
        },
        # the adapters' step counts are what fitted the CPU sessions that trained the shipped bundle, not
        # converged values: held-out fine identity (scale 0.75) was still rising for FaceID (0.35 at 1200
        # steps, 0.37 at 2400, 0.39 at 3600) and InstantID (0.28 at 500, 0.34 at 1500, 0.37 at 3000, 0.40 at
        # 4500, 0.44 at 6000, 0.45 at 7500, 0.46 at 10500, now nearly flat); IP-Adapter and Plus stayed at
        # 0.30 from 800 to 1600 steps
        "faceid": {"max_steps": 3600},
        "ip-adapter": {"max_steps": 1600},
        "ip-adapter-plus": {"max_steps": 1600},
        "instantid": {"max_steps": 10_500, "learning_rate": 5e-4},
    },
    "reduced": {
        "renders": {"samples": 2000, "seed": 0},
        "judge": {"steps": 200, "batch_size": 64, "learning_rate": 2e-3, "seed": 11, "samples": 2000},
        "vae": {"steps": 100, "batch_size": 16, "learning_rate": 1e-3, "seed": 12},
        "text_unet": {"steps": 100, "batch_size": 16, "learning_rate": 5e-4, "seed": 13},
        "unet_detail": {"steps": 20, "batch_size": 8, "learning_rate": 2e-4, "seed": 17},
        "decoder": {"steps": 20, "batch_size": 8, "learning_rate": 5e-4, "seed": 16},
        "clip_vision": {"steps": 100, "batch_size": 64, "learning_rate": 1e-3, "seed": 14},
        "identity": {
            "steps": 200,
            "batch_size": 64,
            "learning_rate": 2e-3,
            "seed": 15,
            "samples": 2000,
            "crowd": 400,
        },
        "adapters": {
            "samples": 500,
            "seed": 3,
            "max_steps": 50,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "lora_rank": 16,
        },
    },
}


def _with_steps(profile: dict[str, Any], steps: dict[str, int]) -> dict[str, Any]:
    """``profile`` with other step counts (``max_steps`` for the adapter entries), all else the same."""
    key = {name: "max_steps" if name in (*ADAPTER_STAGES, "adapters") else "steps" for name in steps}
    return {
        name: {**settings, key[name]: steps[name]} if name in steps else settings
        for name, settings in profile.items()
    }


#: The whole build in under two hours on two CPU cores (96 min measured): the full profile's models and
#: settings at about half its steps. Its base does not yet follow prompts well (background 0.44 vs 1.0 for
#: the full profile; README), so it checks that a build works rather than making a bundle worth shipping.
PROFILES["cpu"] = _with_steps(
    PROFILES["full"],
    {
        "judge": 1500,
        "vae": 800,
        "text_unet": 1800,
        "unet_detail": 600,
        "decoder": 400,
        "clip_vision": 1000,
        "identity": 1200,
        "ip-adapter": 400,
        "ip-adapter-plus": 400,
        "faceid": 1000,
        "instantid": 600,
    },
)


#: One H200 (``--device cuda``), the whole bundle in one run of about 9 minutes -- the device tool gives one
#: command 10 -- written out stage by stage (``--pack``). Every world trainer runs its fast path there
#: (bfloat16 autocast, data on the GPU, fused AdamW, no host sync per step; ``max_seconds`` caps each stage
#: and anneals its rate on the time used, so a slower machine than planned still ends on time).
#:
#: Rates (samples/s on the H200; ``text_unet``'s from the lean loop measured in ../shared/notes/gpu_h200.md,
#: the rest estimates to be replaced by the first run's ``samples_per_second``) and the arithmetic:
#:
#: ================  ======================  ==========  =======  ====================================
#: stage             model                   rate (est)  cap [s]  steps x batch = samples
#: ================  ======================  ==========  =======  ====================================
#: renders           40k train, 20k judge,   ~4,000/s       --    ~20 s on 15 processes (270/s each)
#:                   20k adapter PNGs
#: judge             1.0M CNN                ~25,000         20    1000 x 512 = 0.51M (shipped 0.38M)
#: vae               2.9M, 8 latent ch.      ~15,000         50    2900 x 256 = 0.74M (shipped 0.06M)
#: text_unet         10.4M UNet (64,128,128)  7,000 [1]     140     950 x 1024 = 0.97M (shipped 0.26M)
#:                   x2 + 3.3M text encoder
#: unet_detail       UNet only               ~8,000          20     155 x 1024 = 0.16M
#: decoder           decoder only            ~25,000         15    1450 x 256 = 0.37M
#: clip_vision       0.9M ViT + text tower   ~30,000         15     880 x 512 = 0.45M
#: identity          detector + recogniser   ~20,000         25    1000 x 512 = 0.51M
#: adapters          accelerate loop, bf16   ~2,000 [2]   15/15/25/35  (as many steps as fit)
#: ================  ======================  ==========  =======  ====================================
#:
#: [1] measured at batch 1024: 9,900/s for the shipped (32,64,128) x1 4.2M UNet, 6,800/s for a (64,128,256)
#:     x2 24.4M one. This UNet has that one's two upper levels (64 channels at 16x16, where faces are drawn,
#:     and where nearly all the FLOPs are) and a narrower 4x4 level: about the same rate. A wider one does
#:     not fit: with its ControlNet copy it would push the float16 bundle past 64 MB.
#: [2] ``idcraft train``'s loop reads the loss every step and decodes PNGs; each adapter stage first
#:     trains 30 steps, measures its rate and resumes for what fits its cap.
#:
#: Training caps 285 s + adapters 90 s; fixed costs: renders ~20 s, start-up ~15 s, per stage model
#: set-up, evaluation and saving ~5 s (x 7 = 35 s), the adapters' set-up and feature caches ~55 s, packing
#: ~1.5 s per stage (~18 s): about 520 s in all, 9 minutes. The UNet sees 1M samples in that budget;
#: "several million" (issue #23) needs a run of its own: ``--stages text_unet unet_detail --force ...
#: --time-scale 3``. The models fit the pack (at most 7 archives of 16 MiB) and, in float16, the 64 MB
#: bundle (``idcraft world unpack --float16``); tests/world/test_gpu_profile.py checks both.
PROFILES["h200"] = {
    "renders": {"samples": 40_000, "seed": 0},
    "judge": {
        "steps": 1000,
        "batch_size": 512,
        "learning_rate": 4e-3,
        "seed": 11,
        "samples": 20_000,
        "max_seconds": 20,
    },
    "vae": {
        "steps": 2900,
        "batch_size": 256,
        "learning_rate": 2e-3,
        "seed": 12,
        "max_seconds": 50,
        "config": {
            "block_out_channels": (48, 96, 96),
            "layers_per_block": 2,
            "latent_channels": 8,
            "warmup_steps": 200,
        },
    },
    "text_unet": {
        "steps": 950,
        "batch_size": 1024,
        "learning_rate": 8e-4,
        "seed": 13,
        "max_seconds": 140,
        "config": {
            "block_out_channels": (64, 128, 128),
            "layers_per_block": 2,
            "attention_head_dim": (4, 8, 8),
            "warmup_steps": 100,
        },
    },
    "unet_detail": {"steps": 155, "batch_size": 1024, "learning_rate": 3e-4, "seed": 17, "max_seconds": 20},
    "decoder": {"steps": 1450, "batch_size": 256, "learning_rate": 1e-3, "seed": 16, "max_seconds": 15},
    "clip_vision": {"steps": 880, "batch_size": 512, "learning_rate": 2e-3, "seed": 14, "max_seconds": 15},
    "identity": {
        "steps": 1000,
        "batch_size": 512,
        "learning_rate": 3e-3,
        "seed": 15,
        "samples": 40_000,
        "crowd": 0,
        "max_seconds": 25,
    },
    "adapters": {
        "samples": 20_000,
        "seed": 3,
        "max_steps": 4000,
        "batch_size": 256,
        "learning_rate": 2e-3,
        "lora_rank": 16,
        "mixed_precision": "bf16",
        "num_workers": 8,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 20,
        "progress": False,  # no progress bar in the run's log (train.csv in the run folder has every step)
    },
    "ip-adapter": {"max_seconds": 15},
    "ip-adapter-plus": {"max_seconds": 15},
    "faceid": {"max_seconds": 25},
    "instantid": {"max_seconds": 35, "learning_rate": 1e-3},
}

#: Every stage end to end at toy sizes: a build's plumbing (including 8 latent channels through every
#: adapter, the VAE ceiling and packing) checked on two CPU cores in about a minute
#: (tests/world/test_rebuild_tiny.py). Its models are noise.
_TINY_SD = {
    "text_hidden_size": 32,
    "text_num_hidden_layers": 1,
    "text_intermediate_size": 64,
    "block_out_channels": (16, 32, 32),
    "attention_head_dim": (2, 2, 2),
    "norm_num_groups": 8,
    "warmup_steps": 2,
    "eval_samples": 16,
}
PROFILES["tiny"] = {
    "renders": {"samples": 192, "seed": 0},
    "judge": {
        "steps": 4,
        "batch_size": 32,
        "learning_rate": 2e-3,
        "seed": 11,
        "samples": 160,
        "config": {"stem": 8, "channels": [8, 8, 8], "hidden": 16},
    },
    "vae": {
        "steps": 4,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "seed": 12,
        "ceiling_samples": 16,
        "config": {
            "block_out_channels": (8, 16, 16),
            "norm_num_groups": 8,
            "latent_channels": 8,
            "eval_samples": 16,
            "warmup_steps": 2,
        },
    },
    "text_unet": {"steps": 4, "batch_size": 16, "learning_rate": 1e-3, "seed": 13, "config": _TINY_SD},
    "unet_detail": {"steps": 2, "batch_size": 8, "learning_rate": 2e-4, "seed": 17, "eval_samples": 16},
    "decoder": {
        "steps": 2,
        "batch_size": 8,
        "learning_rate": 5e-4,
        "seed": 16,
        "eval_samples": 16,
        "ceiling_samples": 16,
    },
    "clip_vision": {
        "steps": 4,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "seed": 14,
        "config": {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "projection_dim": 24,
            "text_hidden_size": 32,
            "text_num_hidden_layers": 1,
            "text_num_attention_heads": 2,
            "text_intermediate_size": 64,
            "warmup_steps": 2,
            "group_size": 4,
            "eval_samples": 32,
        },
    },
    "identity": {
        "steps": 4,
        "batch_size": 32,  # 16 (+3 negatives) crashes torch 2.13's CPU detector backward on these renders
        "learning_rate": 2e-3,
        "seed": 15,
        "samples": 192,
        "crowd": 0,
        "config": {
            "detector_widths": [8, 12, 16, 24],
            "recogniser_widths": [8, 12, 16, 24],
            "crop_width": 14,
            "crop_height": 20,
            "eval_samples": 32,
            "eval_negatives": 8,
            "presence_threshold": 0.0,  # every image has a face: a 4-step detector finds none by itself
        },
    },
    "adapters": {
        "samples": 24,
        "seed": 3,
        "max_steps": 2,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "lora_rank": 4,
    },
}


def _stage_output(root: Path, stage: str) -> Path:
    if stage in ADAPTER_STAGES:
        return root / bundle.ADAPTERS[stage]
    return (
        root
        / {
            "judge": bundle.JUDGE,
            "vae": "work/vae",
            "text_unet": bundle.SD,
            "unet_detail": f"{bundle.SD}/unet",
            "decoder": f"{bundle.SD}/vae",
            "clip_vision": bundle.IMAGE_ENCODER,
            "identity": bundle.IDENTITY,
        }[stage]
    )


def _scaled(settings: dict[str, Any], factor: float) -> dict[str, Any]:
    """A profile with every stage's steps (``max_steps``) and time cap multiplied by ``factor``."""
    out = {}
    for name, stage in settings.items():
        stage = dict(stage)
        if name != "renders":
            for key in ("steps", "max_steps", "max_seconds"):
                if key in stage:
                    value = stage[key] * factor
                    stage[key] = max(1, round(value)) if key != "max_seconds" else round(value, 1)
        out[name] = stage
    return out


def _with_latent_channels(settings: dict[str, Any], channels: int) -> dict[str, Any]:
    if channels not in LATENT_CHANNELS:
        raise IdcraftError(
            f"latent channels {channels}: expected one of {', '.join(map(str, LATENT_CHANNELS))}."
        )
    vae = dict(settings["vae"])
    vae["config"] = {**vae.get("config", {}), "latent_channels": int(channels)}
    return {**settings, "vae": vae}


class _Tee(io.TextIOBase):
    """Writes through to ``stream`` and keeps the complete lines written (the run's log)."""

    def __init__(self, stream, lines: list[str]):
        self.stream, self.lines, self._partial = stream, lines, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self._partial += text
        *done, self._partial = self._partial.replace("\r", "\n").split("\n")
        self.lines.extend(line for line in done if line.strip())
        del self.lines[:-LOG_LINES]
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class Builder:
    """One build: the output folder, the profile's settings, the record, the renders (made once)."""

    def __init__(
        self,
        output: str | os.PathLike,
        profile: str,
        device: str,
        workers: int | None,
        *,
        pack: str | os.PathLike | None = None,
        keep_going: bool = False,
        latent_channels: int | None = None,
        time_scale: float = 1.0,
    ):
        import torch

        if profile not in PROFILES:
            raise IdcraftError(f"profile {profile!r}: expected one of {', '.join(PROFILES)}.")
        if not time_scale > 0:
            raise IdcraftError(f"time scale {time_scale}: expected a positive factor.")
        settings = PROFILES[profile]
        if latent_channels is not None:
            settings = _with_latent_channels(settings, latent_channels)
        if time_scale != 1.0:
            settings = _scaled(settings, time_scale)
        self.root = Path(output)
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.profile, self.device, self.workers = profile, device, workers
        self.pack_dir = Path(pack) if pack is not None else None
        self.keep_going = keep_going
        self.failed: dict[str, str] = {}
        self.log: list[str] = []
        self.record_path = self.root / bundle.BUILD_RECORD
        self.record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {}
        self.environment = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": _device_name(device),
            "cpu_threads": torch.get_num_threads(),
        }
        self.record.update(
            {
                "command": " ".join(["idcraft", *sys.argv[1:]]) if sys.argv else "",
                "profile": profile,
                "renders": self.settings["renders"],
            }
        )
        self.record.setdefault("stages", {})
        self._arrays = None
        self.forced: frozenset[str] = frozenset()

    @property
    def arrays(self):
        if self._arrays is None:
            start = time.perf_counter()
            spec = self.settings["renders"]
            self._arrays = render_arrays(
                spec["samples"], spec["seed"], workers=self.workers, cache=self.root / "work"
            )
            self.record["renders_seconds"] = round(time.perf_counter() - start, 1)
        return self._arrays

    def run(self, stages: Sequence[str], force: Sequence[str] = ()) -> dict:
        self.forced = frozenset(force)
        begin = time.perf_counter()
        entry = {
            "command": self.record["command"],
            "profile": self.profile,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stages": list(stages),
            "log": self.log,
        }
        self.record.setdefault("runs", []).append(entry)
        with contextlib.redirect_stdout(_Tee(sys.stdout, self.log)):
            for stage in stages:
                self._stage(stage, force)
            minutes = (time.perf_counter() - begin) / 60
            print(f"build: {minutes:.1f} min for this run; record in {self.record_path}")
        entry["seconds"] = round(time.perf_counter() - begin, 1)
        if self.failed:
            entry["failed"] = dict(self.failed)
        self._save_record()
        self._pack()
        return self.record

    def _stage(self, stage: str, force: Sequence[str]) -> None:
        out = _stage_output(self.root, stage)
        if out.exists() and stage in self.record["stages"] and stage not in force:
            print(f"[{stage}] exists, skipped ({out})")
            return
        missing = [
            need
            for need in REQUIRES.get(stage, ())
            if need in self.failed or not _stage_output(self.root, need).exists()
        ]
        if missing and self.keep_going:
            self.failed[stage] = f"not run: needs {', '.join(missing)}"
            print(f"[{stage}] skipped: it needs {', '.join(missing)}, which failed or is missing", flush=True)
            return
        print(f"[{stage}] training ...", flush=True)
        start = time.perf_counter()
        settings = self.settings.get(stage, {})
        if stage in ADAPTER_STAGES:  # shared adapter settings, then the method's own
            settings = {**self.settings["adapters"], **settings}
        try:
            measurements = STAGE_FUNCTIONS[stage](self, out, _copy(settings))
        except Exception as exc:  # noqa: BLE001 -- recorded, and re-raised unless keep_going
            if not self.keep_going:
                raise
            self.failed[stage] = f"{type(exc).__name__}: {exc}"
            self.record.setdefault("failures", {})[stage] = {
                "error": self.failed[stage],
                "traceback": traceback.format_exc()[-4000:],
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(
                f"[{stage}] FAILED after {time.perf_counter() - start:.0f} s: {self.failed[stage]}",
                flush=True,
            )
            self._save_record()
            return
        seconds = round(time.perf_counter() - start, 1)
        self.record["stages"][stage] = {
            "settings": settings,
            "seconds": seconds,
            "device": self.device,
            "environment": self.environment,
            "measurements": measurements,
        }
        self.record.get("failures", {}).pop(stage, None)
        self._save_record()
        print(f"[{stage}] done in {seconds:.0f} s: {json.dumps(measurements)[:300]}", flush=True)
        self._pack()

    def _pack(self) -> None:
        """Write the finished models to the pack folder (a new generation of archives), if there is one."""
        if self.pack_dir is None:
            return
        from .pack import pack_bundle

        try:
            info = pack_bundle(self.root, self.pack_dir)
        except Exception as exc:  # noqa: BLE001 -- packing must not lose the build itself
            print(f"[pack] FAILED: {type(exc).__name__}: {exc}", flush=True)
            return
        print(
            f"[pack] generation {info['generation']}: {info['parts']} archive(s), "
            f"{info['bytes'] / 2**20:.1f} MiB, {len(info['stages'])} stage(s), {info['seconds']:.1f} s",
            flush=True,
        )

    def _save_record(self) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, self.record_path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _copy(settings: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings to hand to its function (which pops from them): nested dicts copied too."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in settings.items()}


def _device_name(device: str) -> str:
    """``device``, with the GPU's name where it is one (``cuda (NVIDIA H200)``)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(dev)})"
    return device


# ---------------------------------------------------------------------------- stages
def _judge(b: Builder, out: Path, s: dict) -> dict:
    from .judge import train_judge

    judge_arrays = render_arrays(s.pop("samples"), s["seed"] + 1000, ids=range(960), workers=b.workers)
    return train_judge(judge_arrays, out, device=b.device, **s)


def _vae(b: Builder, out: Path, s: dict) -> dict:
    from .trainers.vae import train_vae

    ceiling_samples = s.pop("ceiling_samples", CEILING_SAMPLES)
    result = train_vae(b.arrays, out, device=b.device, **s)
    result["ceiling"] = _ceiling(b, out, ceiling_samples, s["seed"])
    return result


#: Held-out renders the VAE ceiling (:func:`~.trainers.vae.vae_ceiling`) is measured on.
CEILING_SAMPLES = 512


def _ceiling(b: Builder, vae_dir: Path, samples: int, seed: int) -> dict | None:
    """The judge's reading of held-out renders after a round trip through the VAE in ``vae_dir`` (the
    fine-attribute ceiling of every method; issue #23's goal: >= 0.85 fine), when the judge is built."""
    if not samples or not (b.root / bundle.JUDGE).is_dir():
        return None
    from diffusers import AutoencoderKL

    from .arrays import held_out_arrays
    from .judge import Judge
    from .trainers.vae import vae_ceiling

    judge = Judge.load(b.root / bundle.JUDGE, device=b.device)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(b.device).eval()
    result = vae_ceiling(vae, judge, held_out_arrays(samples, seed + 4242), b.device)
    print(
        f"[ceiling] VAE round trip: fine {result['vae']['fine']:.3f} (renders {result['render']['fine']:.3f}), "
        f"coarse {result['vae']['coarse']:.3f}, face PSNR {result['psnr_face']:.2f} dB",
        flush=True,
    )
    return result


def _text_unet(b: Builder, out: Path, s: dict) -> dict:
    from .trainers.text_unet import train_text_unet

    return train_text_unet(b.arrays, _stage_output(b.root, "vae"), out, device=b.device, **s)


def _eval_arrays(s: dict):
    """Held-out renders for a fine-tuning stage whose settings name ``eval_samples`` (else its default)."""
    from .arrays import held_out_arrays

    samples = s.pop("eval_samples", None)
    return None if samples is None else held_out_arrays(samples, s["seed"])


def _unet_detail(b: Builder, out: Path, s: dict) -> dict:
    from .trainers.text_unet import finetune_unet

    held_out = _eval_arrays(s)
    sd = b.root / bundle.SD
    return finetune_unet(b.arrays, sd, sd, device=b.device, eval_arrays=held_out, **s)


def _decoder(b: Builder, out: Path, s: dict) -> dict:
    from .trainers.vae import finetune_decoder

    ceiling_samples = s.pop("ceiling_samples", CEILING_SAMPLES)
    result = finetune_decoder(b.arrays, out, out, device=b.device, eval_arrays=_eval_arrays(s), **s)
    result["ceiling"] = _ceiling(b, out, ceiling_samples, s["seed"])
    return result


def _clip_vision(b: Builder, out: Path, s: dict) -> dict:
    from .trainers.clip_vision import train_clip_vision

    return train_clip_vision(b.arrays, out, device=b.device, **s)


def _identity(b: Builder, out: Path, s: dict) -> dict:
    from .identity import crowd_ids, train_ids
    from .trainers.identity import train_identity

    crowd, samples = s.pop("crowd"), s.pop("samples")
    if crowd:  # the recogniser also learns the crowd (idcraft.world.identity), from renders of its own
        ids = train_ids() + crowd_ids(crowd)
        arrays = render_arrays(samples, s["seed"] + 1000, ids=ids, workers=b.workers, cache=b.root / "work")
    else:
        arrays = b.arrays  # the shared renders (training ids only), rendered only when needed
    return train_identity(arrays, out, device=b.device, **s)


def _adapter_data(b: Builder, s: dict) -> Path:
    from .dataset import MANIFEST, write_dataset

    folder = b.root / "work" / f"adapter-data-{s['samples']}-{s['seed']}"
    if not (folder / MANIFEST).is_file() or not (folder / "masks").is_dir():  # older data had no loss masks
        write_dataset(folder, s["samples"], seed=s["seed"], workers=b.workers)
    return folder / MANIFEST


#: Steps an adapter stage with a time cap trains first, to measure its rate (see :func:`_train_capped`).
PROBE_STEPS = 30


def _train_capped(options: dict[str, Any], max_seconds: float | None) -> tuple[Any, dict[str, Any]]:
    """``idcraft train`` with ``options`` (:class:`~idcraft.training.TrainConfig` fields), within
    ``max_seconds`` where given: :data:`PROBE_STEPS` steps first, timed, then the run resumed (its
    checkpoint, same settings) up to the step count that fits the rest of the budget, at most
    ``max_steps``. The adapters' learning rate is constant after warm-up, so the two rounds train as one
    run would. Returns the last round's result and what the rounds did."""
    from ..training import TrainConfig, train

    target = int(options["max_steps"])
    if not max_seconds or target <= PROBE_STEPS:
        return train(TrainConfig(**options)), {}
    started = time.perf_counter()
    ticks: list[float] = []
    probe = dict(options, max_steps=PROBE_STEPS, checkpoint_every=PROBE_STEPS)
    if options.get("lr_scheduler", "constant") not in ("constant", "constant_with_warmup"):
        raise IdcraftError("a time cap on an adapter stage needs a constant learning rate (after warm-up).")
    first = train(TrainConfig(**probe), callbacks=[lambda info: ticks.append(time.perf_counter())])
    info: dict[str, Any] = {"max_seconds": max_seconds, "probe_steps": first.step}
    if len(ticks) >= 2:
        skip = min(3, len(ticks) - 2)  # the first steps warm up
        gaps = sorted(b - a for a, b in zip(ticks[skip:-1], ticks[skip + 1 :], strict=True))
        per_step = gaps[len(gaps) // 2]  # the median
        setup = ticks[0] - started  # the second round's set-up is no longer (the caches exist by then)
        left = max_seconds - (time.perf_counter() - started) - setup - 0.05 * max_seconds
        steps = min(target, first.step + max(0, int(left / per_step)))
        info.update({"seconds_per_step": round(per_step, 4), "setup_seconds": round(setup, 1)})
    else:  # resumed past the probe (an interrupted build): no rate measured, train to the target
        steps = target
    if steps <= first.step:
        return first, {**info, "steps_done": first.step, "stopped_by": "time"}
    second = train(TrainConfig(**dict(options, max_steps=steps, checkpoint_every=steps, resume=True)))
    second.losses[:0] = first.losses
    stopped = "steps" if steps >= target else "time"
    return second, {**info, "steps_done": second.step, "stopped_by": stopped}


def _newest(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0)


def _oldest(folder: Path) -> float:
    return min((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=float("inf"))


def _start_over(run_dir: Path) -> None:
    """Delete an adapter run's checkpoints and finished files (``idcraft train`` refuses to start a fresh
    run over a finished one), keeping its caches."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for name in ("adapter.safetensors", "adapter.bin"):
        (run_dir / name).unlink(missing_ok=True)


def _drop_stale(b: Builder, run_dir: Path) -> None:
    """Delete an adapter run's caches and checkpoints made before the models they were made with were
    last trained: ``idcraft train`` keys its feature and face-analysis caches by the models' paths, and a
    rebuilt bundle keeps the paths."""
    inputs = max(_newest(b.root / name) for name in (bundle.SD, bundle.IMAGE_ENCODER, bundle.IDENTITY))
    for name in ("cache", "checkpoints"):
        folder = run_dir / name
        if folder.is_dir() and _oldest(folder) < inputs:
            print(f"[{run_dir.name}] {name} older than the models it was made with: deleted", flush=True)
            if name == "checkpoints":
                _start_over(run_dir)
            else:
                shutil.rmtree(folder, ignore_errors=True)


def _adapter(method: str) -> Callable[[Builder, Path, dict], dict]:
    def stage(b: Builder, out: Path, s: dict) -> dict:
        run_dir = b.root / "work" / "runs" / method
        # a forced stage starts over (keeping the feature cache); otherwise an interrupted run continues
        if method in b.forced:
            _start_over(run_dir)
        _drop_stale(b, run_dir)
        extra = {k: s[k] for k in ("num_workers", "lr_scheduler", "lr_warmup_steps", "progress") if k in s}
        options = dict(
            method=method,
            base=str(b.root / bundle.SD),
            data=str(_adapter_data(b, s)),
            output=str(run_dir),
            image_encoder=str(b.root / bundle.IMAGE_ENCODER),
            face_backend="world",
            face_models=str(b.root / bundle.IDENTITY),
            max_steps=s["max_steps"],
            batch_size=s["batch_size"],
            learning_rate=s["learning_rate"],
            lora_rank=s["lora_rank"],  # FaceID's LoRA; the official 128 exceeds the miniature UNet's widths
            seed=s["seed"],
            cache_features=method.startswith("ip-adapter"),  # face methods cache their face analysis
            checkpoint_every=max(1, s["max_steps"] // 2),
            keep_checkpoints=1,
            tensorboard=False,
            mixed_precision=s.get("mixed_precision", "no"),
            cpu=b.device == "cpu",
            resume=(run_dir / "checkpoints").is_dir(),
            **extra,
        )
        result, capped = _train_capped(options, s.get("max_seconds"))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "adapter.safetensors", out)
        if method == "instantid":
            target = b.root / bundle.IDENTITYNET
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(run_dir / "ControlNetModel", target)
        tail = result.losses[-50:] or [float("nan")]
        return {"steps": result.step, "final_loss": round(sum(tail) / len(tail), 5), **capped}

    return stage


STAGE_FUNCTIONS: dict[str, Callable[[Builder, Path, dict], dict]] = {
    "judge": _judge,
    "vae": _vae,
    "text_unet": _text_unet,
    "unet_detail": _unet_detail,
    "decoder": _decoder,
    "clip_vision": _clip_vision,
    "identity": _identity,
    **{method: _adapter(method) for method in ADAPTER_STAGES},
}


def rebuild(
    output: str | os.PathLike,
    *,
    profile: str = "full",
    device: str = "cpu",
    stages: Sequence[str] | None = None,
    force: Sequence[str] = (),
    workers: int | None = None,
    pack: str | os.PathLike | None = None,
    keep_going: bool = False,
    latent_channels: int | None = None,
    time_scale: float = 1.0,
) -> dict:
    """Train the world's models into ``output`` (a bundle folder, see :mod:`.bundle`); return the record.

    ``pack``: a folder to write the finished models to as float16 archives after every stage
    (:func:`~.pack.pack_bundle`). ``keep_going``: record a failing stage and go on with the stages that
    do not need it. ``latent_channels``: the VAE's latent channels (4, 8 or 16), overriding the profile's.
    ``time_scale``: multiply every stage's steps and time cap (a longer or shorter run of the profile)."""
    stages = tuple(stages or STAGES)
    unknown = [s for s in (*stages, *force) if s not in STAGES]
    if unknown:
        raise IdcraftError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}.")
    builder = Builder(
        output,
        profile,
        device,
        workers,
        pack=pack,
        keep_going=keep_going,
        latent_channels=latent_channels,
        time_scale=time_scale,
    )
    record = builder.run(stages, force)
    record["held_out_ids"] = len(held_out_ids())
    builder._save_record()
    return record
