"""Scenes: where and how a character is shown, everything a caption can ask for besides identity.

A scene is a small set of named attributes (:data:`SCENE_ATTRIBUTES`), each with a visible, checkable
effect: ``background`` picks a procedural backdrop, ``position`` the horizontal third the character
stands in, ``size`` its scale, ``pose`` its placement and rotation. ``variant`` only changes background
details (cloud, star and building layout); it is recorded as ground truth but never captioned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import IdcraftError

BACKGROUNDS: tuple[str, ...] = ("beach", "forest", "snow", "city", "night", "desert", "room")
POSITIONS: tuple[str, ...] = ("left", "centre", "right")
SIZES: tuple[str, ...] = ("small", "large")
#: ``tilt_left``: the top of the character leans towards the image's left (counter-clockwise as seen).
POSES: tuple[str, ...] = ("standing", "tilt_left", "tilt_right", "jumping")
#: Background detail variants per backdrop.
NUM_VARIANTS = 4
#: The neutral backdrop of reference portraits; not a scene a caption or :func:`random_scene` uses.
STUDIO = "studio"

SCENE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "background": BACKGROUNDS,
    "position": POSITIONS,
    "size": SIZES,
    "pose": POSES,
}


@dataclass(frozen=True)
class Scene:
    """Scene attributes of one rendered sample (see :data:`SCENE_ATTRIBUTES`)."""

    background: str = "room"
    position: str = "centre"
    size: str = "large"
    pose: str = "standing"
    variant: int = 0

    def __post_init__(self) -> None:
        for name, values in SCENE_ATTRIBUTES.items():
            value = getattr(self, name)
            if value not in values and not (name == "background" and value == STUDIO):
                raise IdcraftError(f"scene {name}={value!r}: expected one of {values}.")
        if not 0 <= self.variant < NUM_VARIANTS:
            raise IdcraftError(f"scene variant={self.variant}: expected 0 to {NUM_VARIANTS - 1}.")

    def attributes(self) -> dict[str, str]:
        """The captioned scene attributes by name (no variant): what a judge checks was obeyed."""
        return {name: getattr(self, name) for name in SCENE_ATTRIBUTES}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(**{k: data[k] for k in ("background", "position", "size", "pose", "variant") if k in data})


def random_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random scene (every attribute independent), drawn from ``rng``."""
    return Scene(
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        position=POSITIONS[int(rng.integers(len(POSITIONS)))],
        size=SIZES[int(rng.integers(len(SIZES)))],
        pose=POSES[int(rng.integers(len(POSES)))],
        variant=int(rng.integers(NUM_VARIANTS)),
    )


#: The scene of reference portraits: centred, large, upright, on the neutral studio backdrop.
REFERENCE_SCENE = Scene(background=STUDIO, position="centre", size="large", pose="standing")
