"""The world's vocabulary: every caption it writes is in it, its example prompts pass the check, and
words it never learnt (or no backdrop) are named in a warning."""

from __future__ import annotations

import numpy as np

from idcraft.world.captions import caption
from idcraft.world.identity import identity_from_id
from idcraft.world.scene import BACKGROUNDS, random_scene
from idcraft.world.vocabulary import EXAMPLE_PROMPTS, check_prompt, known_words, vocabulary, vocabulary_text


def test_every_caption_passes_and_names_a_background():
    rng = np.random.default_rng(0)
    for index in range(200):
        scene = random_scene(rng)
        who = identity_from_id(index % 50) if index % 2 else None
        assert check_prompt(caption(who, scene, rng)) == []
    assert all(check_prompt(p) == [] for p in EXAMPLE_PROMPTS)


def test_unknown_words_and_a_missing_background_are_named():
    warnings = check_prompt("A portrait in a Garden")
    assert len(warnings) == 2
    assert "does not know the words garden, portrait" in warnings[0]
    assert all(name in warnings[1] for name in BACKGROUNDS)
    assert check_prompt("a creature in the centre, at the beach") == [
        check_prompt("a creature at the beach")[0]
    ]  # "at" is not a caption word; "beach" names the backdrop
    assert check_prompt("") == []


def test_the_vocabulary_lists_every_attribute():
    v = vocabulary()
    assert list(v["backgrounds"]) == list(BACKGROUNDS)
    assert v["backgrounds"]["city"] == "in a city street" and v["poses"]["tilt_left"] == "leaning to the left"
    assert {"creature", "beach", "pear-shaped", "teal", "little"} <= known_words()
    text = vocabulary_text()
    assert "under a night sky" in text and EXAMPLE_PROMPTS[0] in text


def test_world_help_lists_the_vocabulary(capsys):
    import pytest

    from idcraft.cli import main

    with pytest.raises(SystemExit):
        main(["world", "--help"])
    out = capsys.readouterr().out
    assert "backgrounds: beach (on a beach)" in out and "leaning to the left" in out
