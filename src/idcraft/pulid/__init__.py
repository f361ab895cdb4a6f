"""PuLID (SDXL v1.1 and FLUX v0.9.x): the identity encoder chain and its SDXL injection.

* :mod:`.idformer` — :class:`IDFormer`, the release's ``id_adapter.*`` / ``pulid_encoder.*`` group.
* :mod:`.eva_clip` — the EVA02-CLIP vision tower (class token + the hidden states IDFormer reads).
* :mod:`.bisenet` — facexlib's BiSeNet face parser.
* :mod:`.preprocess` — 512 alignment, parsing -> white/grey face, resize + CLIP normalisation.
* :mod:`.encoder` — :class:`PulidEncoder`: faces -> cond/uncond ID tokens, any stage given or computed.
* :mod:`.sdxl` — ID cross-attention beside every SDXL ``attn2`` (ortho off / v1 / v2, zero tokens).
* :mod:`.sampling` — the official k-diffusion-style samplers (DPM++ 2M Karras, DPM++ SDE).
"""

from __future__ import annotations

from .encoder import FaceStages, IdTokens, PulidEncoder
from .idformer import IDFormer

__all__ = ["FaceStages", "IDFormer", "IdTokens", "PulidEncoder"]
