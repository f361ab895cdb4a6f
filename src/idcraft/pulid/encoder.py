"""PuLID's identity encoder: reference face(s) -> ID tokens for the cond branch and the uncond branch.

The chain (official ``get_id_embedding``) and where each stage can be given instead of computed:

    photo --detect--> raw antelopev2 embedding [512]      (FaceStages.embedding)
          --align---> 512x512 aligned face                (FaceStages.aligned_face)
          --BiSeNet-> label map                           (FaceStages.parsing)
          --white/grey, resize, CLIP norm, EVA02-CLIP--> class token [E] (L2-normalised) + 5 hidden states
    id_cond = raw embedding ++ class token [512+E]        (FaceStages.id_cond / .vit_hidden)
    IDFormer(id_cond of every face, hidden states of every face concatenated) -> ID tokens [1, 32, C]
    uncond tokens = IDFormer(zeros shaped like one face's inputs)

Detection itself (insightface pack, largest face or ``face_index``) belongs to the caller, which hands over
the face's keypoints and raw embedding; everything after it happens here. Nothing of a request is stored
on the encoder, so one encoder serves concurrent requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import IdcraftError
from . import preprocess
from .idformer import IDFormer

#: Width of the raw antelopev2 (glintr100) ArcFace embedding.
ARCFACE_DIM = 512


@dataclass
class FaceStages:
    """One reference face at whatever stage the caller has it. A later stage given skips the earlier ones:
    ``id_cond`` + ``vit_hidden`` skip everything; ``parsing`` skips BiSeNet; ``aligned_face`` skips the
    alignment (``photo`` + ``kps`` are then not needed); ``embedding`` is always needed unless ``id_cond``
    is given (the caller detects the face or loads a saved raw embedding)."""

    photo: np.ndarray | None = None  # HxWx3 uint8 RGB
    kps: np.ndarray | None = None  # 5x2 keypoints in the photo
    embedding: np.ndarray | torch.Tensor | None = None  # RAW (not normalised) antelopev2 embedding [512]
    aligned_face: np.ndarray | None = None  # 512x512x3 uint8 RGB
    parsing: np.ndarray | None = None  # 512x512 CelebAMask-HQ labels
    id_cond: torch.Tensor | None = None  # [512 + E]
    vit_hidden: Sequence[torch.Tensor] | None = None  # num_scales x [T, W]


@dataclass
class IdTokens:
    """The encoder's output for one identity (one or several faces): ``cond`` and ``uncond`` ``[1, Q, C]``."""

    cond: torch.Tensor
    uncond: torch.Tensor

    def to(self, device=None, dtype=None) -> IdTokens:
        return IdTokens(self.cond.to(device, dtype), self.uncond.to(device, dtype))


class PulidEncoder(nn.Module):
    """IDFormer plus the optional models before it (EVA02-CLIP tower, BiSeNet). ``eva`` maps a normalised
    image ``[N, 3, S, S]`` to ``(class token [N, E], [hidden states])`` and has ``image_size``; ``parser``
    maps an ImageNet-normalised face ``[N, 3, 512, 512]`` to label logits ``[N, L, 512, 512]``."""

    def __init__(
        self,
        idformer: IDFormer,
        eva: nn.Module | None = None,
        parser: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.idformer = idformer
        self.eva = eva
        self.parser = parser

    # --- stages -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def labels(self, face: torch.Tensor) -> torch.Tensor:
        """BiSeNet labels ``[N, 1, H, W]`` of a [0, 1] RGB face ``[N, 3, 512, 512]``."""
        if self.parser is None:
            raise IdcraftError(
                "face parsing needs BiSeNet: pass --face-parser parsing_bisenet.pth (facexlib's file), "
                "or give the label map with --face-parsing."
            )
        weight = next(iter(self.parser.parameters()), None) if isinstance(self.parser, nn.Module) else None
        x = preprocess.parsing_input(face)
        if weight is not None:
            x = x.to(weight.device, weight.dtype)
        logits = self.parser(x)
        return logits.argmax(dim=1, keepdim=True).to(face.device)

    @torch.no_grad()
    def vision(self, features_image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """EVA02-CLIP of the face-features image ``[N, 3, H, W]`` in [0, 1]: (L2-normalised class token,
        hidden states)."""
        if self.eva is None:
            raise IdcraftError(
                "PuLID reads the face with EVA02-CLIP-L-14-336: pass --eva-clip EVA02_CLIP_L_336_psz14_s6B.pt."
            )
        weight = next(self.eva.parameters())
        x = preprocess.eva_input(
            features_image.float(), self.eva.image_size, self.eva.image_mean, self.eva.image_std
        )
        cls, hidden = self.eva(x.to(weight.device, weight.dtype))
        cls = cls / torch.norm(cls, 2, 1, True)
        return cls, list(hidden)

    @torch.no_grad()
    def condition(self, face: FaceStages) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(id_cond [1, 512+E], hidden states num_scales x [1, T, W])`` of one face."""
        if face.id_cond is not None and face.vit_hidden is not None:
            return face.id_cond.reshape(1, -1), [h.reshape(1, *h.shape[-2:]) for h in face.vit_hidden]
        if face.embedding is None:
            raise IdcraftError(
                "PuLID needs the face's raw antelopev2 embedding (detect the face or --face-embedding)."
            )
        embedding = torch.as_tensor(np.asarray(face.embedding, dtype=np.float32)).reshape(1, -1)
        if embedding.shape[1] != ARCFACE_DIM:
            raise IdcraftError(
                f"PuLID's face embedding is antelopev2's raw {ARCFACE_DIM}-d ArcFace vector; got {embedding.shape[1]} values."
            )
        if face.aligned_face is not None:
            aligned = preprocess.check_aligned(face.aligned_face)
        elif face.photo is not None and face.kps is not None:
            aligned = preprocess.align_face(face.photo, face.kps)
        else:
            raise IdcraftError("PuLID needs the reference photo with its face, or --aligned-face (512x512).")
        image = preprocess.face_tensor(aligned)
        if face.parsing is not None:
            labels = torch.from_numpy(preprocess.check_parsing(face.parsing))[None, None]
        else:
            labels = self.labels(image)
        cls, hidden = self.vision(preprocess.face_features_image(image, labels))
        id_cond = torch.cat([embedding.to(cls.device, cls.dtype), cls], dim=-1)
        return id_cond, hidden

    @torch.no_grad()
    def tokens(self, conditions: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor]]]) -> IdTokens:
        """IDFormer of the faces' ``(id_cond, hidden)``: conds stacked ``[1, F, D]``, hidden states
        concatenated along the tokens, as official; uncond = IDFormer of one face's zeros."""
        if not conditions:
            raise IdcraftError("PuLID needs at least one reference face.")
        weight = self.idformer.latents
        cond = torch.stack([c.reshape(1, -1) for c, _ in conditions], dim=1).to(weight.device, weight.dtype)
        scales = len(conditions[0][1])
        hidden = [
            torch.cat([h[i] for _, h in conditions], dim=1).to(weight.device, weight.dtype)
            for i in range(scales)
        ]
        expected = self.idformer.config.id_dim
        if cond.shape[-1] != expected:
            raise IdcraftError(
                f"the identity vector has {cond.shape[-1]} values but this IDFormer reads {expected} "
                f"(512 ArcFace + the EVA tower's output width): is --eva-clip the right checkpoint?"
            )
        ids = self.idformer(cond if len(conditions) > 1 else cond[:, 0], hidden)
        uncond = self.idformer.uncond_tokens(
            cond[:, 0], [h[:, : h.shape[1] // len(conditions)] for h in hidden]
        )
        return IdTokens(ids, uncond)

    def forward(self, faces: Sequence[FaceStages]) -> IdTokens:
        """Every face through its missing stages, then the IDFormer."""
        return self.tokens([self.condition(face) for face in faces])
