"""Captions: the words for a sample, naming only coarse identity attributes and scene attributes.

Fine identity attributes are deliberately never put in words, so that a text-to-image model trained on
these captions can only get them from the reference image. A few paraphrase templates and size synonyms
keep the text encoder from keying on one fixed sentence; the attribute words themselves are fixed so a
caption can be parsed back (:data:`SHAPE_WORDS` and friends).
"""

from __future__ import annotations

import numpy as np

from .identity import Identity
from .scene import STUDIO, Scene

SHAPE_WORDS: dict[str, str] = {
    "round": "round",
    "square": "square",
    "triangle": "triangular",
    "oval": "oval",
    "hexagon": "hexagonal",
    "pear": "pear-shaped",
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_WORDS: dict[str, str] = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
POSE_WORDS: dict[str, str] = {
    "standing": "standing",
    "tilt_left": "leaning to the left",
    "tilt_right": "leaning to the right",
    "jumping": "jumping",
}
BACKGROUND_WORDS: dict[str, str] = {
    "beach": "on a beach",
    "forest": "in a forest",
    "snow": "in the snow",
    "city": "in a city street",
    "night": "under a night sky",
    "desert": "in a desert",
    "room": "in a room",
    STUDIO: "in front of a grey backdrop",
}

#: Paraphrases; ``{who}`` is "a <size> <colour> <shape> creature".
TEMPLATES: tuple[str, ...] = (
    "{who} {pose} {position} {background}",
    "{who} {position}, {pose} {background}",
    "{background_cap}, {who} {pose} {position}",
    "a picture of {who} {pose} {position} {background}",
)


def caption(identity: Identity | None, scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A caption for ``identity`` in ``scene``; with ``rng`` a random paraphrase and size synonym,
    without it the first template (the canonical caption).

    ``identity=None`` gives the scene-only caption ("a small creature ..."): what a user types when the
    identity is to come from the reference image alone, and the text-only baseline that knows nothing of
    who is meant.
    """
    template = TEMPLATES[0] if rng is None else TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    sizes = SIZE_WORDS[scene.size]
    size = sizes[0] if rng is None else sizes[int(rng.integers(len(sizes)))]
    if identity is None:
        who = f"a {size} creature"
    else:
        who = f"a {size} {identity.colour} {SHAPE_WORDS[identity.shape]} creature"
    background = BACKGROUND_WORDS[scene.background]
    return template.format(
        who=who,
        pose=POSE_WORDS[scene.pose],
        position=POSITION_WORDS[scene.position],
        background=background,
        background_cap=background[0].upper() + background[1:],
    )
