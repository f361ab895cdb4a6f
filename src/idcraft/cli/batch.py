"""``idcraft batch``: a JSONL file of generation jobs -> images and a manifest (see :mod:`idcraft.batch`)."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "batch",
        help="generate a JSONL file of jobs: resumable, several processes under torchrun / accelerate",
        description="Generate every job of --requests (one JSON object per line: id, model, prompt, "
        "references, seed, scale, steps, ... as in GenerationRequest) with the models of --config (without "
        "it: the offline world bundled with idcraft, a job's model naming the method), writing "
        "OUTPUT/images/<id>.png and OUTPUT/manifest.jsonl. A re-run skips finished jobs and retries failed "
        "ones; one job's failure is recorded and the others go on. Under `torchrun --nproc_per_node N -m "
        "idcraft batch ...` or `accelerate launch --num_processes N -m idcraft batch ...` each process takes "
        "the jobs whose index %% N is its rank.",
    )
    p.add_argument("--requests", required=True, metavar="JOBS.jsonl", help="the jobs, one JSON object a line")
    p.add_argument(
        "--config",
        metavar="MODELS.yaml",
        help="model files per method (and recipes); left out: the offline world (ip-adapter, "
        "ip-adapter-plus, faceid, instantid; a job without a model runs ip-adapter)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder for images/ and manifest.jsonl")
    p.add_argument(
        "--batch-size", type=int, default=4, help="images per pipeline call (default: %(default)s)"
    )
    p.add_argument(
        "--format", choices=["png", "jpg", "webp"], default="png", help="image format (default: %(default)s)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or auto (default: the config's)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16, float32 or auto (default: the config's)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..batch import read_jobs, run_batch
    from ..model_config import load_models_config

    jobs = read_jobs(args.requests)  # a bad jobs file fails before the world is even looked at
    if args.config is not None:
        config = load_models_config(args.config)
    else:
        from ..world.models_config import world_models_config

        config = world_models_config()
    from ..prechecks import check_device_available

    check_device_available(args.device)  # --device cuda on a machine without one: now, not after loading
    summary = run_batch(
        jobs,
        config,
        args.output,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        image_ext=f".{args.format}",
    )
    if summary.rank == 0:
        failed = [r for r in summary.records.values() if r.get("error")]
        print(
            f"{len(jobs)} job(s): {len(summary.records) - len(failed)} done, {len(failed)} failed"
            f" ({summary.skipped} already finished on this process); {summary.seconds:.0f} s on "
            f"{summary.world_size} process(es); manifest: {args.output}/manifest.jsonl"
        )
        for record in failed[:10]:
            print(f"  {record['id']}: {record['error']}", file=sys.stderr)
        if len(failed) > 10:
            print(f"  ... and {len(failed) - 10} more (see the manifest)", file=sys.stderr)
        return 1 if failed else 0
    return 0
