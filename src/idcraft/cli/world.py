"""``idcraft world``: render characters of the offline world and write training datasets.

``idcraft world render`` draws one identity in one scene (or its reference portrait) and prints the
caption and ground truth as JSON, so a single sample can be inspected or reproduced by hand;
``idcraft world dataset`` writes a folder of PNGs with a JSONL manifest that ``idcraft train --data``
reads directly. ``idcraft world build`` retrains the bundled models (:mod:`idcraft.world.rebuild`);
``idcraft world pack`` / ``unpack`` move a bundle as a few float16 archives (:mod:`idcraft.world.pack`).
"""

from __future__ import annotations

import argparse
import json
import sys

#: Render sizes accepted. The world is drawn for 64x64 (characters, backdrops and keypoints are laid out on
#: that grid and supersampled 4x); below 16 px a character is a few pixels, and 2048 px already draws on
#: an 8192x8192 canvas (about 270 MB per RGBA layer, several layers, seconds per image); beyond that
#: memory and time grow fourfold per doubling for no detail the 64-px design has.
MIN_RESOLUTION, MAX_RESOLUTION = 16, 2048


def check_resolution(value: int) -> int:
    """``value`` if it is a render size the world supports, else a clear error saying the range and why."""
    from ..errors import IdcraftError

    if not MIN_RESOLUTION <= value <= MAX_RESOLUTION:
        raise IdcraftError(
            f"--resolution {value}: must be {MIN_RESOLUTION} to {MAX_RESOLUTION} pixels. The world is drawn "
            f"for 64x64 and supersampled 4x, so {MAX_RESOLUTION} px already means a "
            f"{4 * MAX_RESOLUTION}x{4 * MAX_RESOLUTION} canvas per layer; below {MIN_RESOLUTION} px a "
            "character is a few pixels."
        )
    return value


def register(subparsers) -> None:
    from ..world.scene import BACKGROUNDS, NUM_VARIANTS, POSES, POSITIONS, SIZES
    from ..world.vocabulary import vocabulary_text

    p = subparsers.add_parser(
        "world",
        help="render the offline character world (images, captions, ground truth, datasets)",
        description="Procedural characters with known identities in captioned scenes: the offline world "
        "idcraft's tiny models are trained and judged on.",
        epilog=vocabulary_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="world_command", metavar="ACTION", required=True)

    r = sub.add_parser("render", help="render one identity in one scene; prints caption and ground truth")
    r.add_argument("--id", type=int, required=True, help="identity id (0 to NUM_IDENTITIES-1)")
    r.add_argument("--background", choices=BACKGROUNDS, default="room", help="backdrop (default room)")
    r.add_argument(
        "--position", choices=POSITIONS, default="centre", help="horizontal third (default centre)"
    )
    r.add_argument("--size", choices=SIZES, default="large", help="character scale (default large)")
    r.add_argument("--pose", choices=POSES, default="standing", help="placement and tilt (default standing)")
    r.add_argument("--variant", type=int, choices=range(NUM_VARIANTS), default=0, help="backdrop details")
    r.add_argument("--reference", action="store_true", help="render the identity's reference portrait")
    r.add_argument("--seed", type=int, help="jitter placement and paraphrase the caption with this seed")
    r.add_argument(
        "--resolution",
        type=int,
        default=64,
        help=f"image size in pixels, {MIN_RESOLUTION} to {MAX_RESOLUTION} (default 64)",
    )
    r.add_argument(
        "--output",
        required=True,
        metavar="IMAGE",
        help="where to write the image (.png, .jpg or .webp; the extension picks the format)",
    )
    r.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    r.set_defaults(func=run_render)

    d = sub.add_parser("dataset", help="write PNGs and a JSONL manifest for idcraft train")
    d.add_argument("--output", required=True, metavar="DIR", help="folder to write (manifest.jsonl inside)")
    d.add_argument("--samples", type=int, required=True, help="number of samples")
    d.add_argument("--seed", type=int, default=0, help="seed of identities, scenes and jitter (default 0)")
    d.add_argument(
        "--split",
        choices=["train", "held-out", "all"],
        default="train",
        help="identities to draw from: train (default; never a held-out id), held-out, or all",
    )
    d.add_argument(
        "--reference",
        choices=["canonical", "scene", "none"],
        default="canonical",
        help="reference per sample: the identity's portrait (default), the identity in another scene, "
        "or none (each image is its own reference)",
    )
    d.add_argument(
        "--resolution",
        type=int,
        default=64,
        help=f"image size in pixels, {MIN_RESOLUTION} to {MAX_RESOLUTION} (default 64)",
    )
    d.add_argument("--workers", type=int, default=None, help="render processes (default: every core)")
    d.set_defaults(func=run_dataset)

    from ..world.rebuild import PROFILES, STAGES

    b = sub.add_parser(
        "build",
        help="retrain every bundled world model (VAE, text encoder, UNet, encoders, judge, adapters)",
        description="Rebuild the world bundle in order, skipping stages already in --output, and record "
        "settings, seeds and wall times in OUTPUT/BUILD.json. Use it with IDCRAFT_WORLD_BUNDLE=OUTPUT.",
    )
    b.add_argument("--output", required=True, metavar="DIR", help="bundle folder to write")
    b.add_argument(
        "--profile",
        choices=list(PROFILES),
        default="full",
        help="full (the shipped bundle; about 3 h on 2 CPU cores), cpu (about half the steps; 96 min on "
        "2 CPU cores, a weaker base), h200 (one H200 with --device cuda: about 9 min, a wider base and a "
        "VAE with 8 latent channels; docs/world-gpu.md), reduced (minutes, for tests) or tiny (every "
        "stage at toy sizes, about 20 s: checks a build's plumbing)",
    )
    b.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    b.add_argument(
        "--stages", nargs="+", choices=STAGES, metavar="STAGE", help=f"only these: {' '.join(STAGES)}"
    )
    b.add_argument("--force", nargs="+", default=[], choices=STAGES, metavar="STAGE", help="retrain these")
    b.add_argument("--workers", type=int, default=None, help="render processes (default: every core)")
    b.add_argument(
        "--pack",
        metavar="DIR",
        default=None,
        help="after every finished stage, write the bundle's models to DIR as float16 archives of at most "
        "16 MiB (at most 7; a run cut off early keeps what finished); restore with idcraft world unpack",
    )
    b.add_argument(
        "--keep-going",
        action="store_true",
        help="record a failing stage in BUILD.json and go on with the stages that do not need it",
    )
    b.add_argument(
        "--latent-channels",
        type=int,
        choices=[4, 8, 16],
        default=None,
        help="the VAE's latent channels (default: the profile's); the UNet and the adapters follow",
    )
    b.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply every stage's steps and time cap by F (e.g. 3 with --stages text_unet: a base "
        "trained three times as long)",
    )
    b.set_defaults(func=run_build)

    u = sub.add_parser(
        "unpack",
        help="restore a bundle folder from the archives of idcraft world build --pack (or world pack)",
        description="Restore a bundle folder from the newest complete set of world-bundle-g<N>-<i>of<k>.tar "
        "archives in a folder: every file checked, safetensors back in float32 (or kept in float16).",
    )
    u.add_argument("--from", dest="source", required=True, metavar="DIR", help="folder holding the archives")
    u.add_argument("--output", required=True, metavar="DIR", help="bundle folder to write")
    u.add_argument(
        "--float16",
        action="store_true",
        help="keep the weights in float16 (half the size; the loaders read them into float32 models)",
    )
    u.set_defaults(func=run_unpack)

    k = sub.add_parser("pack", help="write a bundle folder as float16 archives of at most 16 MiB")
    k.add_argument("--bundle", required=True, metavar="DIR", help="bundle folder to pack")
    k.add_argument("--output", required=True, metavar="DIR", help="folder to write the archives to")
    k.set_defaults(func=run_pack)


def run_render(args: argparse.Namespace) -> int:
    import numpy as np

    from ..errors import IdcraftError
    from ..outputs import atomic_save_image, check_output_path
    from ..world import Scene, identity_from_id, render, render_reference
    from ..world.identity import NUM_IDENTITIES

    check_resolution(args.resolution)
    if not 0 <= args.id < NUM_IDENTITIES:
        raise IdcraftError(f"--id {args.id}: identities are numbered 0 to {NUM_IDENTITIES - 1}.")
    out = check_output_path(args.output, overwrite=args.overwrite, image=True)
    identity = identity_from_id(args.id)
    if args.reference:
        sample = render_reference(identity, args.resolution)
    else:
        scene = Scene(args.background, args.position, args.size, args.pose, args.variant)
        rng = None if args.seed is None else np.random.default_rng(args.seed)
        sample = render(identity, scene, args.resolution, rng)
    atomic_save_image(sample.image, out, overwrite=args.overwrite)
    print(json.dumps({"image": str(out), "text": sample.caption, **sample.ground_truth()}))
    return 0


def run_dataset(args: argparse.Namespace) -> int:
    from ..errors import IdcraftError
    from ..world import held_out_ids, train_ids, write_dataset
    from ..world.identity import NUM_IDENTITIES

    check_resolution(args.resolution)
    if args.samples < 1:
        raise IdcraftError(f"--samples {args.samples}: must be at least 1.")
    ids = {"train": train_ids(), "held-out": held_out_ids(), "all": tuple(range(NUM_IDENTITIES))}[args.split]
    manifest = write_dataset(
        args.output,
        args.samples,
        seed=args.seed,
        ids=ids,
        paired=args.reference != "none",
        reference="canonical" if args.reference == "none" else args.reference,
        size=args.resolution,
        workers=args.workers,
    )
    print(f"wrote {args.samples} samples ({args.split} identities) to {manifest}", file=sys.stderr)
    return 0


def run_build(args: argparse.Namespace) -> int:
    from ..prechecks import check_device_available
    from ..world.rebuild import rebuild

    check_device_available(args.device)
    rebuild(
        args.output,
        profile=args.profile,
        device=args.device,
        stages=args.stages,
        force=args.force,
        workers=args.workers,
        pack=args.pack,
        keep_going=args.keep_going,
        latent_channels=args.latent_channels,
        time_scale=args.time_scale,
    )
    print(f"bundle written to {args.output}; use it with IDCRAFT_WORLD_BUNDLE={args.output}")
    return 0


def run_unpack(args: argparse.Namespace) -> int:
    from ..world.pack import unpack_bundle

    info = unpack_bundle(args.source, args.output, float16=args.float16)
    print(
        f"unpacked generation {info['generation']} ({info['parts']} archive(s), {len(info['written'])} files, "
        f"stages: {' '.join(info['stages']) or 'none'}) to {args.output}; use it with "
        f"IDCRAFT_WORLD_BUNDLE={args.output}"
    )
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from ..world.pack import pack_bundle

    info = pack_bundle(args.bundle, args.output)
    print(
        f"packed {len(info['files'])} files ({info['bytes'] / 2**20:.1f} MiB) into {', '.join(info['paths'])}"
    )
    return 0
