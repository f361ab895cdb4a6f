"""The real CLIP tokenizer, built offline from the bundled BPE vocabulary.

The miniature world's text encoder uses exactly the tokenizer of SD1.5's CLIP text encoder (49,408 tokens:
256 byte symbols, their end-of-word forms, 48,894 merges, start and end tokens), rebuilt from
``clip_vocab/bpe_simple_vocab_16e6.txt.gz`` in the order CLIP's own code builds it, so no download is needed.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from importlib import resources
from pathlib import Path

from ..tiny import _bytes_to_unicode

#: Merges CLIP uses from the file: 49,152 - 256 byte symbols - 2 special tokens.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
START, END = "<|startoftext|>", "<|endoftext|>"


def write_clip_tokenizer_files(directory: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (the Hugging Face CLIP format) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = resources.files("idcraft.world").joinpath("clip_vocab/bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return directory


def clip_tokenizer(directory: str | Path | None = None):
    """A ``transformers.CLIPTokenizer`` identical to SD1.5's (lower-cased, 77 tokens, padded with the end
    token), built from the bundled vocabulary into ``directory`` (a temporary folder by default)."""
    from transformers import CLIPTokenizer

    if directory is None:  # the tokenizer holds its vocabulary in memory, so the folder can go at once
        with tempfile.TemporaryDirectory(prefix="idcraft-clip-tok-") as scratch:
            return clip_tokenizer(scratch)
    folder = write_clip_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(
        str(folder), bos_token=START, eos_token=END, unk_token=END, pad_token=END, model_max_length=77
    )
