"""Helpers for the training tests: fast settings, tiny image sets, a config builder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

#: Fast settings every test starts from: the tiny models' native 32 px, no progress bar or TensorBoard.
FAST = dict(resolution=32, batch_size=2, progress=False, tensorboard=False, checkpoint_every=1000)


def make_images(folder: Path, count: int, *, captions: bool = True, seed: int = 0) -> list[Path]:
    """``count`` small distinct RGB images (of varied aspect) with ``.txt`` sidecars."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        height, width = (40, 48) if i % 2 else (56, 40)
        y, x = np.mgrid[0:height, 0:width]
        image = np.stack(
            [(x * (i + 3)) % 256, (y * (2 * i + 1)) % 256, rng.integers(0, 255, (height, width))], -1
        )
        path = folder / f"img{i:02d}.png"
        Image.fromarray(image.astype(np.uint8)).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"picture number {i}\n")
        paths.append(path)
    return paths


def config(models, data, output, method="ip-adapter", base="sd15", **overrides):
    """A :class:`TrainConfig` on the session's tiny models with :data:`FAST` settings, plus ``overrides``."""
    from idcraft.training import TrainConfig

    settings = dict(
        FAST,
        method=method,
        base=str(models[base]),
        data=str(data),
        output=str(output),
        image_encoder=str(models["encoder"]),
    )
    settings.update(overrides)
    return TrainConfig(**settings)


class Killed(Exception):
    """Stands for the process dying (OOM, preemption) right after a step."""


def kill_at(step: int):
    """A training callback that kills the run right after ``step`` (its checkpoint, if due, is written)."""

    def callback(info):
        if info.step == step:
            raise Killed(step)

    return callback


def killed_and_resumed(make_config: Callable, root: Path, step: int):
    """``(whole, resumed)``: one run to the end in ``root/whole``; the same run in ``root/killed`` killed
    after ``step`` and then resumed there. ``make_config(output, **changes)`` builds each run's config."""
    import pytest

    from idcraft.training import train

    whole = train(make_config(root / "whole"))
    with pytest.raises(Killed):
        train(make_config(root / "killed"), [kill_at(step)])
    return whole, train(make_config(root / "killed", resume=True))
