"""Tokenizers built offline: the tiny byte-level one used by test models, and the real CLIP BPE one."""

from __future__ import annotations

from idcraft.tiny import tiny_tokenizer
from idcraft.world.tokenizer import VOCAB_SIZE, clip_tokenizer


def test_tiny_tokenizer_encodes_every_character():
    tok = tiny_tokenizer()
    assert len(tok) == 514
    ids = tok("a red ball").input_ids
    assert ids[0] == 512 and ids[-1] == 513
    assert ids[1:-1] == [
        ord("a") + 256,
        ord("r"),
        ord("e"),
        ord("d") + 256,
        ord("b"),
        ord("a"),
        ord("l"),
        ord("l") + 256,
    ]
    assert tok("a cat").input_ids != tok("a dog").input_ids


def test_clip_tokenizer_matches_clip_ids(tmp_path):
    tok = clip_tokenizer(tmp_path)
    assert len(tok) == VOCAB_SIZE == 49408
    # Token ids of OpenAI CLIP's tokenizer (the one SD1.5's text encoder was trained with).
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A Photo of a CAT").input_ids == tok("a photo of a cat").input_ids
    padded = tok("hello", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_tokenizers_built_in_scratch_folders_leave_nothing_behind(tmp_path, monkeypatch):
    """Every test model builds a tokenizer; each used to leave a folder in the system temp dir."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tok, clip = tiny_tokenizer(), clip_tokenizer()
    assert list(tmp_path.iterdir()) == []
    assert tok("a cat").input_ids[1:-1] == [ord("a") + 256, ord("c"), ord("a"), ord("t") + 256]
    assert clip("a cat").input_ids == [49406, 320, 2368, 49407]
