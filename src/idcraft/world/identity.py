"""Identities of the procedural character world: who a character is, independent of the scene.

An identity is a tuple of attributes split in two tiers, mirroring real faces:

* **coarse** attributes (body ``shape`` and main ``colour``) are what a caption says about a character;
* **fine** attributes (``tone``, ``pattern`` and ``pattern_colour``, ``eye_style``, ``eye_colour``,
  ``mouth``, ``accessory`` and ``accessory_colour``, ``ears``) are never put in words, so a model can only
  reproduce them by reading the reference image. That is the whole point of the world: text pins down
  "a red round creature", only the reference pins down *which* one.

Ids ``0 .. NUM_IDENTITIES-1`` map to identities through a fixed table built from a stable hash (blake2b,
not Python's salted ``hash`` nor numpy's generators), so the table is identical on every machine and
version. Every (shape, colour) pair has the same number of identities, consecutive ids differ in their
coarse attributes, and two identities of the same coarse class differ in at least
:data:`MIN_FINE_DISTANCE` fine attributes, so identities are distinguishable from the image alone.

A fixed tenth of the ids (:data:`HELD_OUT_IDS`, two per coarse class) is held out from every training
run, so identity transfer can be measured on characters no model has ever seen.

Ids from ``NUM_IDENTITIES`` on name the **crowd** (:func:`crowd_identity`): further characters outside the
table that only the face recogniser trains on, as ArcFace learns from a hundred thousand people no adapter
dataset contains. Without them the recogniser only has to tell the 864 training ids apart, which a few
attributes (colour, tone, eye colour) already do, and its embedding barely carries the rest: a linear
probe on the held-out references read ears at chance (0.28; majority class 0.32) and accessory at 0.54. No crowd
identity repeats a table identity or comes closer to a held-out one than table identities are to each
other, and adapter datasets (:func:`~idcraft.world.dataset.write_dataset`) refuse crowd ids.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

from ..errors import IdcraftError

#: Coarse attributes: named in captions.
SHAPES: tuple[str, ...] = ("round", "square", "triangle", "oval", "hexagon", "pear")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink")

#: Fine attributes: never named in captions (names are chosen to share no word with caption vocabulary).
TONES: tuple[str, ...] = ("pale", "base", "deep")
PATTERNS: tuple[str, ...] = ("plain", "stripes", "spots", "checks")
PATTERN_COLOURS: tuple[str, ...] = ("none", "white", "charcoal", "shade")  # "none" iff pattern is plain
EYE_STYLES: tuple[str, ...] = ("classic", "wide", "sleepy", "dot")
EYE_COLOURS: tuple[str, ...] = ("black", "cobalt", "emerald", "crimson")
MOUTHS: tuple[str, ...] = ("smile", "flat", "open", "fang")
ACCESSORIES: tuple[str, ...] = ("none", "hat", "bow", "glasses", "crown")
ACCESSORY_COLOURS: tuple[str, ...] = ("none", "ebony", "ivory", "gold", "cyan")  # "none" iff no accessory
EARS: tuple[str, ...] = ("none", "pointy", "rounded", "antennae", "horns")

COARSE_ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS}
FINE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "tone": TONES,
    "pattern": PATTERNS,
    "pattern_colour": PATTERN_COLOURS,
    "eye_style": EYE_STYLES,
    "eye_colour": EYE_COLOURS,
    "mouth": MOUTHS,
    "accessory": ACCESSORIES,
    "accessory_colour": ACCESSORY_COLOURS,
    "ears": EARS,
}
#: Every identity attribute and its possible values, in a fixed order (classifier heads index these).
ATTRIBUTES: dict[str, tuple[str, ...]] = {**COARSE_ATTRIBUTES, **FINE_ATTRIBUTES}

#: Identities per (shape, colour) class; NUM_IDENTITIES is a multiple of the number of classes so every
#: coarse class is equally represented.
PER_CLASS = 20
NUM_CLASSES = len(SHAPES) * len(COLOURS)
NUM_IDENTITIES = NUM_CLASSES * PER_CLASS  # 960
#: Held-out identities per coarse class (10 %): every class appears both in training and in evaluation,
#: so a held-out score measures fine-detail transfer, not generalisation to unseen coarse combinations.
HELD_OUT_PER_CLASS = 2
#: Two identities of one coarse class differ in at least this many fine attributes.
MIN_FINE_DISTANCE = 3


@dataclass(frozen=True)
class Identity:
    """One character's identity attributes (see :data:`ATTRIBUTES` for the value lists).

    ``id`` is the identity's index in the world table, or -1 for an identity built by hand.
    """

    shape: str
    colour: str
    tone: str = "base"
    pattern: str = "plain"
    pattern_colour: str = "none"
    eye_style: str = "classic"
    eye_colour: str = "black"
    mouth: str = "smile"
    accessory: str = "none"
    accessory_colour: str = "none"
    ears: str = "none"
    id: int = -1

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise IdcraftError(f"identity {name}={getattr(self, name)!r}: expected one of {values}.")
        if (self.pattern == "plain") != (self.pattern_colour == "none"):
            raise IdcraftError('pattern_colour must be "none" exactly when pattern is "plain".')
        if (self.accessory == "none") != (self.accessory_colour == "none"):
            raise IdcraftError('accessory_colour must be "none" exactly when accessory is "none".')

    def attributes(self) -> dict[str, str]:
        """All identity attributes by name (no id): the ground truth a judge's classifiers learn."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def coarse(self) -> dict[str, str]:
        """The attributes a caption may name."""
        return {name: getattr(self, name) for name in COARSE_ATTRIBUTES}

    def fine(self) -> dict[str, str]:
        """The attributes only the reference image carries."""
        return {name: getattr(self, name) for name in FINE_ATTRIBUTES}

    @property
    def coarse_class(self) -> int:
        """Index of the (shape, colour) pair, ``0 .. NUM_CLASSES-1``."""
        return SHAPES.index(self.shape) * len(COLOURS) + COLOURS.index(self.colour)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Identity:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of ``parts`` that is the same on every platform, process and Python version
    (Python's ``hash`` is salted per process; numpy's generators may change between versions)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _fine_candidate(*key: object) -> dict[str, str]:
    """Deterministic pseudo-random fine attributes, one set per ``key`` (the table's: class and attempt)."""

    def pick(name: str, values: tuple[str, ...]) -> str:
        return values[stable_hash(*key, name) % len(values)]

    pattern = pick("pattern", PATTERNS)
    accessory = pick("accessory", ACCESSORIES)
    return {
        "tone": pick("tone", TONES),
        "pattern": pattern,
        "pattern_colour": "none" if pattern == "plain" else pick("pattern_colour", PATTERN_COLOURS[1:]),
        "eye_style": pick("eye_style", EYE_STYLES),
        "eye_colour": pick("eye_colour", EYE_COLOURS),
        "mouth": pick("mouth", MOUTHS),
        "accessory": accessory,
        "accessory_colour": "none"
        if accessory == "none"
        else pick("accessory_colour", ACCESSORY_COLOURS[1:]),
        "ears": pick("ears", EARS),
    }


def fine_distance(a: Identity, b: Identity) -> int:
    """Number of fine attributes in which two identities differ."""
    return sum(getattr(a, name) != getattr(b, name) for name in FINE_ATTRIBUTES)


def _class_of_id(i: int) -> int:
    """Coarse class of id ``i``: ids cycle through the classes in a fixed shuffled order, so neighbouring
    ids never share a class (and rarely a shape or colour)."""
    return _CLASS_ORDER[i % NUM_CLASSES]


_CLASS_ORDER: tuple[int, ...] = tuple(
    sorted(range(NUM_CLASSES), key=lambda c: stable_hash("idcraft-world-class", c))
)


@lru_cache(maxsize=1)
def _table() -> tuple[Identity, ...]:
    """The world's identity table: per class, candidates are accepted greedily while they keep
    :data:`MIN_FINE_DISTANCE` from every identity already accepted in that class."""
    per_class: dict[int, list[dict[str, str]]] = {}
    for c in range(NUM_CLASSES):
        accepted: list[dict[str, str]] = []
        attempt = 0
        while len(accepted) < PER_CLASS:
            cand = _fine_candidate("idcraft-world", c, attempt)
            attempt += 1
            if all(sum(cand[k] != other[k] for k in cand) >= MIN_FINE_DISTANCE for other in accepted):
                accepted.append(cand)
        per_class[c] = accepted
    table = []
    for i in range(NUM_IDENTITIES):
        c = _class_of_id(i)
        shape, colour = SHAPES[c // len(COLOURS)], COLOURS[c % len(COLOURS)]
        table.append(Identity(shape=shape, colour=colour, **per_class[c][i // NUM_CLASSES], id=i))
    return tuple(table)


#: The crowd is open-ended; ids beyond this many are treated as typos.
MAX_CROWD = 1_000_000


def _crowd_stream() -> Iterator[Identity]:
    """Crowd identities in id order: hash draws (shape, colour and fine attributes as the table draws
    them) that repeat no table or earlier crowd identity and keep :data:`MIN_FINE_DISTANCE` from every
    held-out identity of their coarse class."""
    taken = {tuple(identity.attributes().values()) for identity in _table()}
    held = [_table()[i] for i in sorted(HELD_OUT_IDS)]
    accepted = 0
    for draw in itertools.count():
        key = ("idcraft-world-crowd", draw)
        shape = SHAPES[stable_hash(*key, "shape") % len(SHAPES)]
        colour = COLOURS[stable_hash(*key, "colour") % len(COLOURS)]
        cand = Identity(shape=shape, colour=colour, **_fine_candidate(*key), id=NUM_IDENTITIES + accepted)
        attributes = tuple(cand.attributes().values())
        if attributes in taken or any(
            h.coarse_class == cand.coarse_class and fine_distance(h, cand) < MIN_FINE_DISTANCE for h in held
        ):
            continue
        taken.add(attributes)
        accepted += 1
        yield cand


#: The crowd drawn so far (in id order) and the stream that extends it (it draws nothing until asked).
_crowd: list[Identity] = []
_crowd_draws: Iterator[Identity] = _crowd_stream()


def crowd_identity(k: int) -> Identity:
    """The ``k``-th crowd identity (id ``NUM_IDENTITIES + k``); drawn in order, so ``k`` always names the
    same character."""
    if not 0 <= int(k) < MAX_CROWD:
        raise IdcraftError(f"crowd identity {k}: expected 0 to {MAX_CROWD - 1}.")
    while len(_crowd) <= int(k):
        _crowd.append(next(_crowd_draws))
    return _crowd[int(k)]


def crowd_ids(num: int) -> tuple[int, ...]:
    """The ids of the first ``num`` crowd identities (for :func:`~idcraft.world.arrays.render_arrays`)."""
    return tuple(range(NUM_IDENTITIES, NUM_IDENTITIES + int(num)))


def resolve_identity(i: int) -> Identity:
    """The identity of a table id or a crowd id (renderers accept both; use :func:`identity_from_id` where
    only the world table is meant)."""
    if int(i) >= NUM_IDENTITIES:
        return crowd_identity(int(i) - NUM_IDENTITIES)
    return identity_from_id(i)


def identity_from_id(i: int) -> Identity:
    """The identity with id ``i`` (``0 <= i < NUM_IDENTITIES``); the same on every machine."""
    if not 0 <= int(i) < NUM_IDENTITIES:
        raise IdcraftError(f"identity id {i}: expected 0 to {NUM_IDENTITIES - 1}.")
    return _table()[int(i)]


def all_identities() -> tuple[Identity, ...]:
    """Every identity of the world, by id."""
    return _table()


def _held_out() -> frozenset[int]:
    by_class: dict[int, list[int]] = {}
    for i in range(NUM_IDENTITIES):
        by_class.setdefault(_class_of_id(i), []).append(i)
    held = set()
    for ids in by_class.values():
        held.update(sorted(ids, key=lambda i: stable_hash("idcraft-world-held-out", i))[:HELD_OUT_PER_CLASS])
    return frozenset(held)


#: Ids never used for training (2 of the 20 identities of every coarse class, chosen by a stable hash).
HELD_OUT_IDS: frozenset[int] = _held_out()


@lru_cache(maxsize=1)
def train_ids() -> tuple[int, ...]:
    """Ids available to training runs: every id not in :data:`HELD_OUT_IDS`, ascending."""
    return tuple(i for i in range(NUM_IDENTITIES) if i not in HELD_OUT_IDS)


def held_out_ids() -> tuple[int, ...]:
    """The held-out ids, ascending (for evaluation)."""
    return tuple(sorted(HELD_OUT_IDS))
