"""One process of a two-process training test (started by test_distributed.py through torchrun or
``accelerate launch``): an uninterrupted run, a run killed after step 3, its resume; rank 0 writes what
the test checks to ``OUTPUT/result.json``.

    python -m torch.distributed.run --nproc_per_node 2 distributed_worker.py fsdp2 METHOD MODELS DATA OUTPUT
    accelerate launch --config_file ds.yaml distributed_worker.py deepspeed METHOD MODELS DATA OUTPUT

METHOD is ``ip-adapter-plus`` (MODELS holds ``sd15``, ``encoder``) or ``instantcharacter`` (``flux``,
``siglip``, ``dinov2``). Under FSDP2 each transformer block of the denoiser is its own shard group.

``fsdp2``: accelerate runs FSDP only on GPUs (on a CPU-only machine it refuses the plugin, or quietly
counts one process per process), so this mode builds accelerate's own FSDP2 plugin and sets the
distributed type accelerate would set on GPUs; everything after that (``prepare`` -> ``fully_shard``, the
sharded optimizer checkpoint, the gather) is accelerate's and torch's code on a gloo process group.
``deepspeed``: nothing forced; accelerate's DeepSpeed configuration as launched, on DeepSpeed's CPU
accelerator.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

#: The denoiser's transformer blocks, each wrapped (sharded) on its own, as for a large base.
BLOCKS = {
    "ip-adapter-plus": ["BasicTransformerBlock"],
    "instantcharacter": ["FluxTransformerBlock", "FluxSingleTransformerBlock"],
}


def forced_fsdp2(blocks: list[str]):
    """A replacement for ``Trainer._accelerator``: accelerate with FSDP2 on a CPU gloo group."""

    def make(self):
        from accelerate import Accelerator, PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=blocks,
            state_dict_type="SHARDED_STATE_DICT",
            sync_module_states=False,  # its parameter init looks for a GPU
            cpu_ram_efficient_loading=False,
        )
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, mixed_precision="no")
        # Both shared states: accelerate copies PartialState's into AcceleratorState whenever one is built.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        return accelerator

    return make


class Killed(Exception):
    pass


def main() -> None:
    mode, method, models, data, output = sys.argv[1:6]
    models, output = Path(models), Path(output)
    torch.set_num_threads(1)

    from safetensors.torch import load_file

    from idcraft.training import TrainConfig, Trainer, train

    original = Trainer._accelerator
    if mode == "fsdp2":
        Trainer._accelerator = forced_fsdp2(BLOCKS[method])

    if method == "instantcharacter":
        import dataclasses

        from idcraft.instantcharacter.tiny import tiny_projector_config

        projector = dataclasses.asdict(tiny_projector_config())
        projector.pop("width"), projector.pop("output_width")  # read from the models
        models_settings = dict(
            base=str(models / "flux"),
            image_encoder=str(models / "siglip"),
            image_encoder_2=str(models / "dinov2"),
            extra={"max_sequence_length": 16, "projector": projector},
        )
    else:
        models_settings = dict(base=str(models / "sd15"), image_encoder=str(models / "encoder"))

    def config(name: str, **more) -> TrainConfig:
        return TrainConfig(
            method=method,
            **models_settings,
            data=data,
            output=str(output / name),
            resolution=32,
            batch_size=2,
            max_steps=4,
            checkpoint_every=2,
            learning_rate=1e-3,
            drop_image=0.2,  # drops differ between the processes' samples
            drop_text=0.2,
            drop_both=0.1,
            max_grad_norm=1.0,
            seed=7,
            progress=False,
            tensorboard=False,
            **more,
        )

    def kill_at_3(info) -> None:
        if info.step == 3:
            raise Killed

    seen: dict = {}

    def inspect(info) -> None:
        """What the run really is, seen from inside at step 1: backend, and whether FSDP sharded."""
        if info.step == 1 and not seen:
            from torch.distributed.tensor import DTensor

            trainer = info.trainer
            params = list(trainer.recipe.model.parameters())
            seen["distributed_type"] = trainer.accelerator.distributed_type.value
            seen["processes"] = trainer.accelerator.num_processes
            seen["sharded"] = sum(isinstance(p, DTensor) for p in params)
            seen["parameters"] = len(params)

    whole = train(config("whole"), callbacks=[inspect])
    try:
        train(config("killed"), callbacks=[kill_at_3])
        raise AssertionError("the run was not killed")
    except Killed:
        pass
    trainer = Trainer(config("killed", resume=True))
    resumed = trainer.run()
    accelerator = trainer.accelerator

    # The same run under plain data parallelism over the same process group: the reference the sharded
    # run must match (the same data split, draws and averaged gradients).
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    Trainer._accelerator = original
    AcceleratorState._reset_state()
    PartialState().distributed_type = DistributedType.MULTI_CPU  # what accelerate set up before forcing
    reference = train(config("ddp", cpu=True), callbacks=[])

    if accelerator.is_main_process:
        a = load_file(str(output / "whole" / "adapter.safetensors"))
        b = load_file(str(output / "killed" / "adapter.safetensors"))
        d = load_file(str(output / "ddp" / "adapter.safetensors"))
        early = load_file(str(output / "killed" / "checkpoints" / "step-00000002" / "adapter.safetensors"))
        checkpoint = output / "killed" / "checkpoints" / "step-00000004"
        trainable = load_file(str(checkpoint / "trainable.safetensors"))
        result = {
            **seen,
            "resumed_from": resumed.resumed_from.name if resumed.resumed_from else None,
            "losses_whole": whole.losses,
            "losses_resumed": resumed.losses,
            "losses_ddp": reference.losses,
            "identical": sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a),
            "ddp_max_difference": max(float((a[k] - d[k]).abs().max()) for k in a),
            "moved": sum(not torch.equal(a[k], early[k]) for k in a),
            "tensors": len(a),
            "trainable_tensors": len(trainable),
            "checkpoint_files": sorted(p.name for p in checkpoint.iterdir()),
            "backend": json.loads((checkpoint / "state.json").read_text())["backend"],
            "ddp_backend": json.loads(
                (output / "ddp" / "checkpoints" / "step-00000004" / "state.json").read_text()
            )["backend"],
            "files": sorted(p.name for p in resumed.files),
        }
        (output / "result.json").write_text(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
