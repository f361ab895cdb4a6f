"""What the world's text encoder knows: the words of its captions, and a check of a prompt against them.

The miniature SD1.5 was trained on the world's captions alone (:mod:`.captions`), so it draws the seven
backdrops, three positions, two sizes, four poses, six shapes and eight colours those captions name, and
nothing else: "a portrait in a garden" is two words it never saw, and it draws whatever backdrop the
rest of the prompt leans to. :func:`vocabulary` lists what it knows (for ``GET /v1/models``, the page
and ``idcraft world --help``), :func:`check_prompt` says which words of a prompt it does not know.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from .captions import BACKGROUND_WORDS, POSE_WORDS, POSITION_WORDS, SHAPE_WORDS, SIZE_WORDS, TEMPLATES
from .identity import COLOURS, SHAPES
from .scene import BACKGROUNDS, POSES, POSITIONS, SIZES, STUDIO

#: The noun every caption uses for a character.
SUBJECT = "creature"
#: Prompts that use only the world's words (the page's and the docs' examples).
EXAMPLE_PROMPTS: tuple[str, ...] = (
    "a large creature standing in the centre on a beach",
    "a small creature jumping on the left in the snow",
    "a large creature leaning to the right on the right in a forest",
    "a small creature standing in the centre under a night sky",
    "a large creature standing on the left in a desert",
)

WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
PLACEHOLDER = re.compile(r"\{[a-z_]+\}")


def vocabulary() -> dict[str, Any]:
    """Every scene and identity word the world's captions use, by attribute, with the caption phrase of
    each value (``{"backgrounds": {"beach": "on a beach", ...}, ...}``) and example prompts."""
    return {
        "subject": SUBJECT,
        "backgrounds": {name: BACKGROUND_WORDS[name] for name in BACKGROUNDS},
        "positions": {name: POSITION_WORDS[name] for name in POSITIONS},
        "sizes": {name: list(SIZE_WORDS[name]) for name in SIZES},
        "poses": {name: POSE_WORDS[name] for name in POSES},
        "shapes": {name: SHAPE_WORDS[name] for name in SHAPES},
        "colours": list(COLOURS),
        "templates": list(TEMPLATES),
        "examples": list(EXAMPLE_PROMPTS),
    }


@lru_cache(maxsize=1)
def known_words() -> frozenset[str]:
    """Every word of every caption the world can write (templates, phrases, shapes, colours, sizes)."""
    text = " ".join(
        [
            SUBJECT,
            *(PLACEHOLDER.sub(" ", t) for t in TEMPLATES),
            *(BACKGROUND_WORDS[name] for name in (*BACKGROUNDS, STUDIO)),
            *POSITION_WORDS.values(),
            *POSE_WORDS.values(),
            *SHAPE_WORDS.values(),
            *SHAPES,
            *COLOURS,
            *(w for words in SIZE_WORDS.values() for w in words),
        ]
    )
    return frozenset(WORD.findall(text.lower()))


def _background_words() -> dict[str, str]:
    """The word of each backdrop's phrase that names it (``"city street"`` -> city, street)."""
    out = {}
    for name in BACKGROUNDS:
        for word in WORD.findall(BACKGROUND_WORDS[name]):
            if word not in ("on", "in", "a", "the", "under"):
                out[word] = name
    return out


def check_prompt(prompt: str) -> list[str]:
    """Warnings for a prompt the world cannot draw as asked: words its captions never use (it ignores
    them, or worse, reads them as the nearest word it knows), and no backdrop named (it picks one)."""
    words = WORD.findall(prompt.lower())
    if not words:
        return []
    known = known_words()
    unknown = sorted(dict.fromkeys(w for w in words if w not in known))
    backgrounds = ", ".join(BACKGROUNDS)
    out = []
    if unknown:
        out.append(
            f"the offline world does not know the words {', '.join(unknown)}: its model learnt only its "
            f"captions' words. Backgrounds: {backgrounds}; positions: left, centre, right; sizes: small, "
            "large; poses: standing, jumping, leaning to the left/right (e.g. "
            f"{EXAMPLE_PROMPTS[0]!r})."
        )
    if not any(w in _background_words() for w in words):
        out.append(f"the prompt names no background the world knows ({backgrounds}): it picks one itself.")
    return out


def vocabulary_text() -> str:
    """:func:`vocabulary` as a few lines of plain text (``idcraft world --help``)."""
    v = vocabulary()
    sizes = ", ".join(f"{name} ({'/'.join(words)})" for name, words in v["sizes"].items())
    lines = [
        "What the world's model can draw (its captions' words; other words do little or nothing):",
        f"  subject:     a {v['subject']}",
        "  backgrounds: " + ", ".join(f"{k} ({p})" for k, p in v["backgrounds"].items()),
        "  positions:   " + ", ".join(v["positions"].values()),
        f"  sizes:       {sizes}",
        "  poses:       " + ", ".join(v["poses"].values()),
        "  shapes:      " + ", ".join(v["shapes"].values()),
        "  colours:     " + ", ".join(v["colours"]),
        "Example prompts:",
        *(f"  {p}" for p in v["examples"]),
    ]
    return "\n".join(lines)
