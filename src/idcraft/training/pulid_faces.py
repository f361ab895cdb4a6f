"""What PuLID's two training recipes (SDXL ``pulid``, FLUX ``pulid-flux``) share: the face inputs and the
alignment loss.

Faces. Each manifest record gives the reference photo, its RAW antelopev2 ``embedding`` (``.npy``, as
``idcraft faces --save-embeddings`` writes it) and the face's five ``kps`` (the face is aligned from them;
without ``kps`` the reference must already be the 512x512 aligned face). The frozen EVA02-CLIP tower
(``--image-encoder``) and BiSeNet (``--image-encoder-2``) turn the aligned face into the IDFormer's inputs,
exactly as at inference (:class:`~idcraft.pulid.encoder.PulidEncoder`); ``extra["face_parsing"] = "none"``
skips BiSeNet and greys the whole face (not the official preprocessing; for tests and parser-less set-ups).
The features are packed into one tensor per sample so the generic feature cache can keep them.

Alignment (PuLID paper, section 3.2): the same noisy input and prompt go through the denoiser twice, with
and without the ID tokens; at every place the identity enters, with ``K`` the prompt's features there and
``Q`` / ``Q_id`` the image features without / with the identity,

* layout: ``|| Q_id - Q ||^2`` -- the identity should keep the layout the prompt gives without it;
* semantic: ``|| softmax(K Q_id^T / sqrt(d)) Q_id - softmax(K Q^T / sqrt(d)) Q ||^2`` -- each word should
  pick the same image features with and without the identity;

weighted ``align_sem`` (0.6) and ``align_layout`` (0.1) as in the paper. The paper aligns along a fast
(Lightning) sampling path from pure noise; here the diffusion branch's noisy latents stand in for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FaceError, IdcraftError

#: The paper's alignment weights.
ALIGN_SEM = 0.6
ALIGN_LAYOUT = 0.1
#: ``extra`` settings every PuLID recipe reads (besides its own).
FACE_SETTINGS = ("idformer", "align_sem", "align_layout", "face_parsing")


class PulidFacePreprocess:
    """Record -> ``{"face": [3, 512, 512] in [0, 1], "embedding": [512]}`` (picklable, for data workers)."""

    def __init__(self, method: str = "pulid"):
        self.method = method

    def __call__(self, image) -> dict[str, torch.Tensor]:
        raise IdcraftError(
            f"{self.method} training reads each record's embedding and keypoints: use a .jsonl manifest."
        )

    def record_inputs(self, record, geometry) -> dict[str, torch.Tensor]:
        from ..images import load_image
        from ..pulid import preprocess

        paths = record.face.get("embedding")
        if not paths:
            raise FaceError(
                f"{record.image}: no face embedding; {self.method} training needs the reference's raw "
                'antelopev2 embedding as "embedding" in the manifest (idcraft faces --save-embeddings).'
            )
        embedding = np.load(paths[0], allow_pickle=False).reshape(-1).astype(np.float32)
        if embedding.size != 512:
            raise FaceError(f"{paths[0]}: {embedding.size} values, not a 512-d ArcFace embedding.")
        photo = np.asarray(load_image(record.reference_path).convert("RGB"), dtype=np.uint8)
        kps = record.face.get("kps")
        if kps is not None:
            aligned = preprocess.align_face(photo, np.asarray(kps, dtype=np.float32))
        else:
            aligned = preprocess.check_aligned(photo, f"{record.reference_path} (no kps: the aligned face)")
        return {"face": preprocess.face_tensor(aligned)[0], "embedding": torch.from_numpy(embedding)}


class PulidFaceInputs:
    """Mixin for a PuLID recipe: the frozen face models and the features the IDFormer reads. The recipe
    sets ``self.idformer`` (the trained IDFormer) in ``build`` after :meth:`load_face_models`."""

    config: object
    device: torch.device
    weight_dtype: torch.dtype
    idformer: nn.Module
    method_name = "pulid"

    def load_face_models(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """EVA02-CLIP (``--image-encoder``) and, unless ``face_parsing`` is ``none``, BiSeNet
        (``--image-encoder-2``), frozen, as ``self.face_encoder`` (a :class:`PulidEncoder` without IDFormer)."""
        from ..pulid.encoder import PulidEncoder
        from ..pulid.eva_clip import load_eva_tower

        config, method = self.config, self.method_name
        if not config.image_encoder:
            raise IdcraftError(
                f"{method} training needs --image-encoder EVA02_CLIP_L_336_psz14_s6B.pt (the EVA02-CLIP tower)."
            )
        self.parsing = str(config.extra.get("face_parsing", "bisenet"))
        if self.parsing not in ("bisenet", "none"):
            raise IdcraftError(f"face_parsing must be bisenet or none (got {self.parsing!r}).")
        eva = load_eva_tower(config.image_encoder).to(device, weight_dtype).requires_grad_(False).eval()
        parser = None
        if self.parsing == "bisenet":
            if not config.image_encoder_2:
                raise IdcraftError(
                    f"{method} training parses faces with BiSeNet: pass --image-encoder-2 parsing_bisenet.pth, "
                    'or set extra face_parsing: "none".'
                )
            from ..pulid.bisenet import load_bisenet

            parser = (
                load_bisenet(config.image_encoder_2).to(device, weight_dtype).requires_grad_(False).eval()
            )
        self.face_encoder = PulidEncoder(None, eva, parser)

    def idformer_settings(self) -> dict:
        """A fresh IDFormer's settings: widths from the EVA tower, the rest from ``extra["idformer"]``."""
        eva = self.face_encoder.eva
        settings = {"id_dim": 512 + eva.config.embed_dim, "vit_dim": eva.config.width}
        settings.update(self.config.extra.get("idformer", {}))  # e.g. a small IDFormer for tests
        return settings

    def face_modules(self) -> dict[str, nn.Module]:
        frozen = {"eva_clip": self.face_encoder.eva}
        if isinstance(self.face_encoder.parser, nn.Module):
            frozen["face_parser"] = self.face_encoder.parser
        return frozen

    def reference_preprocessor(self) -> PulidFacePreprocess:
        return PulidFacePreprocess(self.method_name)

    @torch.no_grad()
    def encode_references(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Faces and embeddings -> ``[B, R + 5 T, W]``: the identity vector (raw embedding ++ normalised
        EVA class token) in ``R`` rows of the tower's width ``W``, then the five hidden states."""
        from ..pulid import preprocess

        face = inputs["face"].to(self.device, torch.float32)
        if self.parsing == "none":
            labels = torch.ones(face.shape[0], 1, *face.shape[-2:], dtype=torch.long, device=face.device)
        else:
            labels = self.face_encoder.labels(face)
        cls, hidden = self.face_encoder.vision(preprocess.face_features_image(face, labels))
        id_cond = torch.cat([inputs["embedding"].to(cls.device, cls.dtype), cls], dim=-1)
        width = hidden[0].shape[-1]
        rows = -(-id_cond.shape[1] // width)
        padded = F.pad(id_cond, (0, rows * width - id_cond.shape[1])).view(-1, rows, width)
        return torch.cat([padded, *hidden], dim=1)

    def unpack_features(self, features: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`encode_references`' packing undone: ``(id_cond [B, id_dim], hidden states)``."""
        id_dim = self.idformer.config.id_dim
        scales = self.idformer.config.num_scales
        width = features.shape[-1]
        rows = -(-id_dim // width)
        id_cond = features[:, :rows].flatten(1)[:, :id_dim]
        hidden = list(features[:, rows:].chunk(scales, dim=1))
        return id_cond, hidden

    def batch_features(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The batch's IDFormer inputs, from the feature cache or encoded now."""
        features = batch["features"].to(self.device) if "features" in batch else self.encode_references(batch)
        return self.unpack_features(features)

    def align_weights(self) -> tuple[float, float]:
        extra = self.config.extra
        return float(extra.get("align_sem", ALIGN_SEM)), float(extra.get("align_layout", ALIGN_LAYOUT))

    def cache_fingerprint(self) -> dict | None:
        return {
            "recipe": self.method_name,
            "eva_clip": str(self.config.image_encoder),
            "face_parser": str(self.config.image_encoder_2),
            "face_parsing": self.parsing,
            "dtype": str(self.weight_dtype),
        }


def alignment_losses(
    features: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(semantic, layout)`` alignment losses averaged over injection points; ``features`` holds one
    ``(K, Q_id, Q)`` per point (prompt features, image features with and without the identity, ``[B, N, C]``)
    and ``mask`` ``[B]`` says which samples count (those trained with their identity)."""
    zero = mask.new_zeros((), dtype=torch.float32)
    sem, layout = zero, zero
    for keys, with_id, without in features:
        layout = layout + _per_sample_mse(with_id, without, mask)
        sem = sem + _per_sample_mse(_word_response(keys, with_id), _word_response(keys, without), mask)
    count = max(len(features), 1)
    return sem / count, layout / count


def _word_response(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``softmax(K Q^T / sqrt(d)) Q``: for each text token, the image features it attends to."""
    weights = torch.softmax(
        (text.float() @ image.float().transpose(1, 2)) / math.sqrt(image.shape[-1]), dim=-1
    )
    return weights @ image.float()


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the samples with ``mask`` 1 (0 when there are none)."""
    mask = mask.float()
    per = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (per * mask).sum() / mask.sum().clamp(min=1)
