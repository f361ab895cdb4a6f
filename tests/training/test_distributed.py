"""Sharded training: FSDP2 and DeepSpeed ZeRO-2 on two CPU processes (gloo) checkpoint, resume bit for bit
and match plain data parallelism; what cannot work is refused with a message saying what to change.

The two-process runs start ``distributed_worker.py`` (one whole run, one killed after step 3 and resumed,
one DDP reference run, all in one launch to pay the start-up once; about 40 s on two busy cores). FSDP2
needs only torch and accelerate and runs everywhere; accelerate permits FSDP only on GPUs, so the worker
sets the distributed type itself (see its docstring). DeepSpeed runs through ``accelerate launch
--config_file`` unchanged, where ``deepspeed`` is installed (it is not an idcraft dependency).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from idcraft.errors import IdcraftError

from .helpers import config, make_images

WORKER = Path(__file__).with_name("distributed_worker.py")

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is needed for two-process runs",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Run the worker under a launcher; returns rank 0's result."""

    def run(launcher: list[str], mode: str, method: str, models: Path) -> dict:
        root = tmp_path_factory.mktemp(mode)
        make_images(root / "data", 8)
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        environment.pop("WORLD_SIZE", None)
        command = [*launcher, str(WORKER), mode, method, str(models), str(root / "data"), str(root / "out")]
        done = subprocess.run(
            command,
            env=environment,
            capture_output=True,
            text=True,
            timeout=540,
            cwd=str(Path(__file__).parents[2]),
        )
        result = root / "out" / "result.json"
        assert done.returncode == 0 and result.is_file(), done.stdout[-3000:] + done.stderr[-6000:]
        return json.loads(result.read_text())

    return run


def _check(result: dict, backend: str, distributed_type: str) -> None:
    assert result["distributed_type"] == distributed_type and result["processes"] == 2
    assert result["backend"] == backend and result["ddp_backend"] == "ddp"
    assert result["resumed_from"] == "step-00000002"
    assert result["identical"], "killed + resumed must end bit-identical to the uninterrupted run"
    assert result["losses_resumed"] == result["losses_whole"][2:]
    # the same computation as plain data parallelism (same split, draws, averaged gradients)
    assert result["losses_whole"] == pytest.approx(result["losses_ddp"], rel=1e-6)
    assert result["ddp_max_difference"] < 1e-6
    assert result["moved"] == result["tensors"] == result["trainable_tensors"] > 0
    assert result["files"] == ["adapter.safetensors"]


@needs_gloo
def test_fsdp2_two_processes_resume_and_match_ddp(launch, tmp_path):
    """InstantCharacter (FLUX, the base FSDP is for) under FSDP2 with accelerate's per-block wrapping: every
    FLUX block its own shard group with the subject attention inside, all parameters sharded, the sharded
    optimizer checkpoint written and read by both processes, the full adapter gathered for the files."""
    from idcraft.instantcharacter.tiny import save_tiny_encoders, tiny_flux_pipeline

    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    save_tiny_encoders(tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    result = launch(launcher, "fsdp2", "instantcharacter", tmp_path)
    _check(result, "fsdp2", "FSDP")
    assert result["sharded"] == result["parameters"], "FSDP2 holds every parameter as a DTensor shard"
    assert "optimizer_0" in result["checkpoint_files"]


@needs_gloo
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero2_through_accelerate_config(launch, models, tmp_path):
    """IP-Adapter-Plus under DeepSpeed ZeRO-2 from an accelerate config file, nothing forced."""
    settings = tmp_path / "deepspeed.yaml"
    settings.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 2\n"
        f"num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nmain_process_port: {_free_port()}\n"
        "deepspeed_config:\n  zero_stage: 2\n  gradient_accumulation_steps: 1\n"
        "  offload_optimizer_device: none\n  offload_param_device: none\n  zero3_init_flag: false\n"
    )
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(settings)]
    result = launch(launcher, "deepspeed", "ip-adapter-plus", Path(models["sd15"]).parent)
    _check(result, "deepspeed", "DEEPSPEED")
    assert "deepspeed" in result["checkpoint_files"]


# ---------------------------------------------------------------------------- refusals (no processes)
def _accelerator(kind: str, processes: int = 1, **state):
    from accelerate.utils import DistributedType

    return SimpleNamespace(
        distributed_type=DistributedType[kind],
        num_processes=processes,
        is_fsdp2=state.pop("fsdp2", False),
        state=SimpleNamespace(**state),
    )


def test_what_cannot_work_is_refused_with_what_to_change(models, data, tmp_path, monkeypatch):
    from idcraft.training.loop import DEEPSPEED, FSDP2, PLAIN, _backend, _configure_deepspeed

    cfg = config(models, data, tmp_path / "run")
    assert _backend(_accelerator("NO"), cfg) == PLAIN
    assert _backend(_accelerator("FSDP", fsdp2=True), cfg) == FSDP2
    with pytest.raises(IdcraftError, match="FSDP version 1 is not supported: set fsdp_version: 2"):
        _backend(_accelerator("FSDP"), cfg)
    sampled = config(models, data, tmp_path / "run", sample_every=5, sample_reference=str(data / "img00.png"))
    with pytest.raises(IdcraftError, match="--sample-every is not available under FSDP"):
        _backend(_accelerator("FSDP", fsdp2=True), sampled)

    def deepspeed(stage: int, **ds):
        plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=ds)
        return SimpleNamespace(**vars(_accelerator("DEEPSPEED", deepspeed_plugin=plugin)))

    assert _backend(deepspeed(2), cfg) == DEEPSPEED
    with pytest.raises(IdcraftError, match="ZeRO-3 is not supported.*FSDP"):
        _backend(deepspeed(3), cfg)

    accelerator = deepspeed(2, gradient_accumulation_steps="auto", train_micro_batch_size_per_gpu="auto")
    _configure_deepspeed(accelerator, config(models, data, tmp_path / "run", gradient_accumulation=2))
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    assert ds == {
        "gradient_accumulation_steps": 2,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.0,
    }
    clash = deepspeed(2, gradient_accumulation_steps=1)
    with pytest.raises(IdcraftError, match=r"gradient_accumulation_steps = 1.*--gradient-accumulation 2"):
        _configure_deepspeed(clash, config(models, data, tmp_path / "run", gradient_accumulation=2))

    # A launcher's processes that accelerate does not see as one group (FSDP/DeepSpeed configs on a
    # machine without GPUs) would each train alone and overwrite each other's files.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(IdcraftError, match="the launcher started 2 processes but accelerate counts 1.*--cpu"):
        _backend(_accelerator("NO"), cfg)
    assert _backend(_accelerator("MULTI_CPU", processes=2), cfg) == PLAIN


def test_a_checkpoint_resumes_only_under_its_backend(models, data, tmp_path):
    from idcraft.training import train
    from idcraft.training.loop import Trainer
    from idcraft.training.state import latest_checkpoint

    run = tmp_path / "run"
    train(config(models, data, run, max_steps=1))
    folder = latest_checkpoint(run)
    assert json.loads((folder / "state.json").read_text())["backend"] == "ddp"
    trainer = Trainer(config(models, data, run, max_steps=2, resume=True))
    with pytest.raises(IdcraftError, match="written under ddp and this run is fsdp2"):
        trainer._check_resume(folder, 1, "fsdp2")
