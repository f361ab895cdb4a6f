"""The scores of one generated image against its subject and prompt.

Every scoring model is a folder on disk (nothing is downloaded):

* **identity** (faces): the ArcFace embedding of the largest face, through a face backend (the
  insightface-pack backend: ``--face-models ~/.insightface/models/antelopev2``). ``sim_ref`` is the
  cosine similarity between the output's face and the reference's, ``sim_gt`` the same against a
  *second* photo of the same person (the ground truth: not given to the model, so it cannot be copied).
* **copy-paste**: how much closer the output is to the reference than to the other photo, in ArcFace
  angles ``θ(a, b) = arccos(cos(a, b))``::

      copy = (θ(out, gt) - θ(out, ref)) / θ(ref, gt)        in [-1, 1]

  1: the output's face *is* the reference's (pasted); -1: it is the other photo's; about 0: as far from
  both, i.e. a new photo of the person. By the triangle inequality it never leaves [-1, 1]. An image is
  flagged as a copy when ``copy > copy_threshold`` (default 0.5). ``copy_gap = sim_ref - sim_gt`` is
  reported beside it. Both need the ground-truth photo.
* **face rate**: the share of outputs where a face is found at all (identity means are over those).
* **prompt**: CLIP text-image cosine (``clip_t``) between the output and the prompt (a ``CLIPModel``
  folder, or any model with ``get_image_features``/``get_text_features``, such as SigLIP).
* **CLIP-I**, **DINO**: cosine between the output's and the reference's image embeddings (CLIP's
  projected image embedding; the pooled output -- CLS -- of a ``Dinov2Model`` or any ``AutoModel``
  folder): identity for characters that are not human faces.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FaceError, IdcraftError

__all__ = ["ScoringSettings", "Scorer", "aggregate", "copy_score", "subject_embeddings"]

#: Per-image score names (``None`` when not measured), in table order.
IMAGE_SCORES = ("face", "sim_ref", "sim_gt", "copy", "copy_gap", "clip_t", "clip_i", "dino")


@dataclass(frozen=True)
class ScoringSettings:
    """Which scoring models to use (folders), and the copy threshold."""

    face_backend: str | None = "insightface"
    face_models: str | None = None
    clip: str | None = None
    dino: str | None = None
    device: str | None = None
    copy_threshold: float = 0.5
    batch_size: int = 16

    def fingerprint(self) -> dict[str, Any]:
        """What the scores depend on (a cell scored with other settings is scored again)."""
        return {
            "face_backend": self.face_backend,
            "face_models": None if self.face_models is None else str(self.face_models),
            "clip": None if self.clip is None else str(self.clip),
            "dino": None if self.dino is None else str(self.dino),
            "copy_threshold": float(self.copy_threshold),
        }


def copy_score(sim_ref: float, sim_gt: float, sim_ref_gt: float) -> float | None:
    """``(θ(out, gt) - θ(out, ref)) / θ(ref, gt)`` from the three cosines (``None`` when the reference and
    the ground truth are the same picture: the score is then undefined)."""
    theta = [math.acos(max(-1.0, min(1.0, float(c)))) for c in (sim_ref, sim_gt, sim_ref_gt)]
    if theta[2] < 1e-4:
        return None
    return max(-1.0, min(1.0, (theta[1] - theta[0]) / theta[2]))


@dataclass
class SubjectEmbeddings:
    """A subject's reference (and ground-truth) embeddings, computed once per subject."""

    face_ref: np.ndarray | None = None
    face_gt: np.ndarray | None = None
    clip_ref: np.ndarray | None = None
    dino_ref: np.ndarray | None = None
    has_face: bool = False
    note: str | None = None


class Scorer:
    """Loads the scoring models named in :class:`ScoringSettings` (each only if given) and scores images."""

    def __init__(self, settings: ScoringSettings):
        self.settings = settings
        self.notes: list[str] = []
        self.analyser = self._face_analyser(settings)
        self.device = _device(settings.device)
        self.clip = _ClipModel(settings.clip, self.device) if settings.clip else None
        self.dino = _ImageModel(settings.dino, self.device) if settings.dino else None

    def _face_analyser(self, settings: ScoringSettings):
        if settings.face_backend in (None, "", "none"):
            return None
        from ..faces import get_face_analyser

        try:
            kwargs = {"providers": ["cpu"]} if settings.face_backend == "insightface" and _cpu_only() else {}
            return get_face_analyser(settings.face_backend, settings.face_models, **kwargs)
        except FaceError as exc:
            if settings.face_models is not None:
                raise
            self.notes.append(f"no face scores: {exc}")
            return None

    @property
    def measures(self) -> dict[str, bool]:
        return {
            "faces": self.analyser is not None,
            "clip": self.clip is not None,
            "dino": self.dino is not None,
        }

    # ---------------------------------------------------------------- embeddings
    def face_embedding(self, image) -> np.ndarray | None:
        """The L2-normalised embedding of the largest face, or ``None`` when there is none."""
        if self.analyser is None:
            return None
        faces = self.analyser.detect(image)
        if not faces or faces[0].embedding is None:
            return None
        vector = np.asarray(faces[0].embedding, dtype=np.float64)
        norm = np.linalg.norm(vector)
        return vector / norm if norm > 0 else None

    def subject(self, reference, ground_truth=None) -> SubjectEmbeddings:
        from ..images import load_image

        ref = load_image(reference)
        gt = load_image(ground_truth) if ground_truth is not None else None
        out = SubjectEmbeddings()
        if self.analyser is not None:
            out.face_ref = self.face_embedding(ref)
            out.has_face = out.face_ref is not None
            if out.has_face and gt is not None:
                out.face_gt = self.face_embedding(gt)
                if out.face_gt is None:
                    out.note = "no face found in the ground-truth photo"
        if self.clip is not None:
            out.clip_ref = self.clip.images([ref])[0]
        if self.dino is not None:
            out.dino_ref = self.dino.images([ref])[0]
        return out

    # ---------------------------------------------------------------- scores
    def score(
        self, images: Sequence, prompts: Sequence[str], subjects: Sequence[SubjectEmbeddings]
    ) -> list[dict]:
        """One dict of :data:`IMAGE_SCORES` per image (``None`` for what is not measured)."""
        from ..images import load_image

        pictures = [load_image(i) for i in images]
        rows: list[dict] = [dict.fromkeys(IMAGE_SCORES) for _ in pictures]
        step = max(1, self.settings.batch_size)
        if self.clip is not None:
            for k in range(0, len(pictures), step):
                image_e = self.clip.images(pictures[k : k + step])
                text_e = self.clip.texts(list(prompts[k : k + step]))
                for j, (ie, te) in enumerate(zip(image_e, text_e, strict=True)):
                    rows[k + j]["clip_t"] = float(ie @ te)
                    ref = subjects[k + j].clip_ref
                    rows[k + j]["clip_i"] = None if ref is None else float(ie @ ref)
        if self.dino is not None:
            for k in range(0, len(pictures), step):
                for j, e in enumerate(self.dino.images(pictures[k : k + step])):
                    ref = subjects[k + j].dino_ref
                    rows[k + j]["dino"] = None if ref is None else float(e @ ref)
        for row, picture, subject in zip(rows, pictures, subjects, strict=True):
            if self.analyser is None or not subject.has_face:
                continue
            face = self.face_embedding(picture)
            row["face"] = face is not None
            if face is None:
                continue
            row["sim_ref"] = float(face @ subject.face_ref)
            if subject.face_gt is not None:
                row["sim_gt"] = float(face @ subject.face_gt)
                row["copy_gap"] = row["sim_ref"] - row["sim_gt"]
                row["copy"] = copy_score(
                    row["sim_ref"], row["sim_gt"], float(subject.face_ref @ subject.face_gt)
                )
        return rows


def subject_embeddings(scorer: Scorer, reference, ground_truth=None) -> SubjectEmbeddings:
    return scorer.subject(reference, ground_truth)


def aggregate(rows: Sequence[dict], copy_threshold: float = 0.5) -> dict[str, Any]:
    """A cell's means: ``face_rate`` over outputs whose subject has a face, identity scores over outputs
    with a face, ``copy_rate`` = share of those flagged as copies, prompt/CLIP-I/DINO over all."""

    def mean(values) -> float | None:
        values = [float(v) for v in values if v is not None]
        return float(np.mean(values)) if values else None

    faces = [r["face"] for r in rows if r.get("face") is not None]
    copies = [r["copy"] for r in rows if r.get("copy") is not None]
    return {
        "images": len(rows),
        "face_rate": mean(faces),
        "sim_ref": mean(r.get("sim_ref") for r in rows),
        "sim_gt": mean(r.get("sim_gt") for r in rows),
        "copy": mean(copies),
        "copy_gap": mean(r.get("copy_gap") for r in rows),
        "copy_rate": mean([c > copy_threshold for c in copies]) if copies else None,
        "clip_t": mean(r.get("clip_t") for r in rows),
        "clip_i": mean(r.get("clip_i") for r in rows),
        "dino": mean(r.get("dino") for r in rows),
    }


# ---------------------------------------------------------------------------- models
def _cpu_only() -> bool:
    try:
        import onnxruntime

        return "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
    except ImportError:
        return True


def _device(device: str | None):
    from ..models import resolve_device

    return resolve_device(device)


def _processor(folder: str, what: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise IdcraftError(
            f"{what} {folder}: cannot read its preprocessing (preprocessor_config.json, and the tokenizer for "
            f"CLIP): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def _model(folder: str, what: str, device):
    from transformers import AutoModel

    if not os.path.isdir(os.path.expanduser(str(folder))):
        raise IdcraftError(f"{what} {folder}: no such folder (scoring models are read from disk).")
    try:
        model = AutoModel.from_pretrained(os.path.expanduser(str(folder)))
    except Exception as exc:  # noqa: BLE001
        raise IdcraftError(f"{what} {folder}: cannot load it ({type(exc).__name__}: {exc}).") from exc
    return model.to(device).eval()


def _features(output) -> Any:
    """transformers 4 returns a tensor from ``get_*_features``; 5 returns an output with ``pooler_output``."""
    import torch

    return output if torch.is_tensor(output) else output.pooler_output


def _normalise(tensor) -> np.ndarray:
    array = tensor.detach().float().cpu().numpy().astype(np.float64)
    return array / np.maximum(np.linalg.norm(array, axis=-1, keepdims=True), 1e-12)


class _ClipModel:
    """A CLIP-like model folder: image and text embeddings, L2-normalised."""

    def __init__(self, folder: str, device):
        self.model = _model(folder, "--clip", device)
        if not hasattr(self.model, "get_image_features") or not hasattr(self.model, "get_text_features"):
            raise IdcraftError(
                f"--clip {folder}: a {type(self.model).__name__} has no text-image embeddings."
            )
        self.processor = _processor(os.path.expanduser(str(folder)), "--clip")
        self.device = device

    def images(self, images) -> np.ndarray:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        with torch.no_grad():
            pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
            return _normalise(_features(self.model.get_image_features(pixel_values=pixels)))

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        limit = min(int(getattr(tokenizer, "model_max_length", 77) or 77), 77)
        inputs = tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        with torch.no_grad():
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            return _normalise(_features(self.model.get_text_features(**inputs)))


class _ImageModel:
    """Any vision ``AutoModel`` folder (DINOv2 ...): its pooled output (CLS), L2-normalised."""

    def __init__(self, folder: str, device):
        from transformers import AutoImageProcessor

        self.model = _model(folder, "--dino", device)
        try:
            self.processor = AutoImageProcessor.from_pretrained(os.path.expanduser(str(folder)))
        except Exception as exc:  # noqa: BLE001
            raise IdcraftError(f"--dino {folder}: cannot read its preprocessor_config.json ({exc}).") from exc
        self.device = device

    def images(self, images) -> np.ndarray:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        with torch.no_grad():
            out = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.model.dtype))
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return _normalise(pooled)
