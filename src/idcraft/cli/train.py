"""``idcraft train``: train an adapter on a folder of captioned images or a JSONL manifest.

Settings come from defaults, then ``--config FILE`` (YAML or JSON, keys = the long flag names with
underscores or dashes, plus any :class:`~idcraft.training.TrainConfig` field), then the flags given on the
command line. For several GPUs, start it through accelerate (one process per GPU); DDP, FSDP2 and
DeepSpeed ZeRO-1/2 come from accelerate's own configuration (see :mod:`idcraft.training.loop`)::

    accelerate launch --multi_gpu --num_processes 8 -m idcraft train --method ip-adapter ...
    accelerate launch --config_file fsdp2.yaml -m idcraft train --method instantcharacter ...
"""

from __future__ import annotations

import argparse
import sys

#: Listed in --help without importing the training stack (checked against the recipes by the tests).
TRAINABLE = (
    "ip-adapter",
    "ip-adapter-plus",
    "ip-adapter-plus-face",
    "ip-adapter-full-face",
    "faceid",
    "faceid-plus",
    "faceid-plusv2",
    "faceid-portrait",
    "instantid",
    "instantcharacter",
    "infiniteyou",
    "pulid",
    "pulid-flux",
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an adapter (IP-Adapter, FaceID, InstantID, InstantCharacter) on captioned images",
        description=(
            "Train an adapter on a frozen base model. Only the adapter trains; the final weights are written "
            "to OUTPUT/adapter.safetensors in the official layout. Defaults follow the official training "
            "scripts; flags left out fall back to --config, then to those defaults."
        ),
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--method", help=f"method to train ({', '.join(TRAINABLE)})")
    p.add_argument("--base", help="base model: diffusers folder or hub id (SD1.x or SDXL)")
    p.add_argument("--data", help="folder of images with .txt caption sidecars, or a .jsonl manifest")
    p.add_argument("--output", help="run folder: adapter, checkpoints, log.csv, samples")
    p.add_argument(
        "--image-encoder",
        dest="image_encoder",
        help="CLIP image encoder folder or hub id (instantcharacter: SigLIP, google/siglip-so400m-patch14-384; "
        "pulid, pulid-flux: the EVA02-CLIP checkpoint EVA02_CLIP_L_336_psz14_s6B.pt)",
    )
    p.add_argument(
        "--image-encoder-2",
        dest="image_encoder_2",
        help="instantcharacter: the DINOv2 encoder folder or hub id (facebook/dinov2-giant); pulid, pulid-flux: "
        "facexlib's BiSeNet parsing_bisenet.pth",
    )
    p.add_argument(
        "--stage",
        type=int,
        choices=[1, 2, 3],
        help="instantcharacter's training stage (1: 512 px, image = its own reference; 2: 512 px, paired "
        "references; 3: 1024 px, both); sets the default resolution and pairing. infiniteyou: 1 = sim_stage1 "
        "(pretraining), 2 = aes_stage2 (fine-tunes --init-from a stage-1 result)",
    )
    p.add_argument(
        "--id-loss",
        dest="id_loss",
        type=float,
        metavar="WEIGHT",
        help="pulid (SDXL): add PuLID's accurate-ID loss with this weight (0: off): a few-step sampling path "
        "from pure noise with the ID tokens, decoded, the generated face aligned and embedded with facexlib's "
        "ArcFace (recognition_arcface_ir_se50.pth in --face-models or $IDCRAFT_ARCFACE); meant for an "
        "SDXL-Lightning base, steps in --config extra id_loss_steps (4)",
    )
    p.add_argument(
        "--init-from",
        dest="init_from",
        metavar="FILE",
        help="start the trained weights from this adapter file in the official layout (a released adapter "
        "to fine-tune, FaceID's LoRA included, or the previous instantcharacter stage's "
        "OUTPUT/adapter.safetensors; infiniteyou: a release folder, InfuseNetModel/ + image_proj_model.bin); "
        "checked against the method, base model and encoder first",
    )
    p.add_argument(
        "--init-controlnet",
        dest="init_controlnet",
        metavar="DIR",
        help="instantid: start IdentityNet from this ControlNet folder (e.g. InstantX's ControlNetModel/) "
        "instead of the base UNet's copy",
    )
    p.add_argument("--config", dest="config_file", help="YAML or JSON file of settings")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=int, help="passes over the data when --max-steps is not given (100)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its newest complete checkpoint (a corrupt or truncated one "
        "is passed over); refused when --method, --base or --data differ from the run's",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --output (its checkpoints and adapter files are deleted first); "
        "without it a finished or started run there is never overwritten",
    )
    p.add_argument(
        "--format",
        dest="format",
        choices=["safetensors", "bin"],
        help="bin also writes the official OUTPUT/adapter.bin",
    )
    p.add_argument(
        "--export-dtype",
        dest="export_dtype",
        choices=["fp32", "fp16", "bf16"],
        help="dtype of the written adapter files (fp32; official releases are fp16); training and resume "
        "always use the float32 weights",
    )
    p.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, help="clip gradients (off)")
    p.add_argument("--resolution", type=int, help="training image size (default: the base's native size)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="per process (8)")
    p.add_argument(
        "--gradient-accumulation",
        dest="gradient_accumulation",
        type=int,
        help="micro-batches per optimizer step (1)",
    )
    p.add_argument(
        "--learning-rate", "--lr", dest="learning_rate", type=float, help="AdamW learning rate (1e-4)"
    )
    p.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay (0.01)")
    p.add_argument("--lr-scheduler", dest="lr_scheduler", help="diffusers schedule name (constant)")
    p.add_argument(
        "--lr-warmup-steps",
        dest="lr_warmup_steps",
        type=int,
        help="steps of linear learning-rate warm-up (0)",
    )
    p.add_argument(
        "--mixed-precision",
        dest="mixed_precision",
        choices=["no", "fp16", "bf16"],
        help="autocast precision (default: accelerate's launch configuration, else no)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, slower steps",
    )
    p.add_argument("--seed", type=int, help="seed of the data order and every random draw (42)")
    p.add_argument("--num-tokens", dest="num_tokens", type=int, help="image tokens (default: the method's)")
    p.add_argument("--num-workers", dest="num_workers", type=int, help="data loading processes (0)")
    p.add_argument("--lora-rank", dest="lora_rank", type=int, help="FaceID LoRA rank (128, the official)")
    p.add_argument(
        "--face-backend",
        dest="face_backend",
        help="face analysis for FaceID/InstantID data, any idcraft.faces backend that gives ArcFace "
        "embeddings (insightface, the default), unless the manifest gives embeddings",
    )
    p.add_argument(
        "--face-models", dest="face_models", help="insightface model pack folder (antelopev2/buffalo_l)"
    )
    p.add_argument(
        "--cache-features",
        dest="cache_features",
        action="store_true",
        help="encode references once into OUTPUT/cache (or --cache-dir) and reuse them",
    )
    p.add_argument("--cache-dir", dest="cache_dir", help="feature cache folder (default: OUTPUT/cache)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, help="steps between checkpoints")
    p.add_argument(
        "--keep-checkpoints", dest="keep_checkpoints", type=int, help="newest checkpoints kept (3)"
    )
    p.add_argument("--log-every", dest="log_every", type=int, help="steps between log.csv rows (1)")
    p.add_argument("--sample-every", dest="sample_every", type=int, help="steps between sample images")
    p.add_argument("--sample-prompt", dest="sample_prompt", help='prompt of the sample images ("a photo")')
    p.add_argument("--sample-reference", dest="sample_reference", help="reference image of the sample images")
    p.add_argument("--sample-steps", dest="sample_steps", type=int, help="denoising steps per sample (30)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training.config import TrainConfig  # checks the settings before the training stack loads

    values = {k: v for k, v in vars(args).items() if k not in ("func", "command", "verbose", "config_file")}
    if "format" in values:
        values["formats"] = ("safetensors", "bin") if values.pop("format") == "bin" else ("safetensors",)
    if "progress" not in values:
        values["progress"] = sys.stderr.isatty()
    config = TrainConfig.from_sources(getattr(args, "config_file", None), **values)
    _check_paths(config)
    from ..training import train

    result = train(config)
    for path in result.files:
        print(path)
    if result.main_process and result.skipped.skipped:
        print(
            f"{len(result.skipped.skipped)} sample(s) skipped: see {config.output_dir / 'skipped.txt'}",
            file=sys.stderr,
        )
    return 0


def _check_paths(config) -> None:
    """What can be checked in milliseconds, before torch loads: the method is known, the data exists,
    and a base model given as a local path is there."""
    from pathlib import Path

    from ..errors import IdcraftError
    from ..prechecks import check_training_data
    from ..registry import METHODS, get_method

    try:
        get_method(config.method)  # the command line trains the registry's methods (each has a recipe)
    except IdcraftError:
        raise IdcraftError(
            f"training is not available for method {config.method!r}; "
            f"trainable methods: {', '.join(sorted(METHODS))}."
        ) from None
    if not Path(config.data).expanduser().exists():
        raise IdcraftError(f"--data {config.data}: no such folder or manifest.")
    check_training_data(config.data)
    base = str(config.base)
    if base.startswith((".", "/", "~")) and not Path(base).expanduser().exists():
        raise IdcraftError(f"--base {base}: no such folder.")
