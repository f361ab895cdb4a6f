"""Training recipe for IP-Adapter-FaceID (FaceID, FaceID-Plus, FaceID-PlusV2, FaceID-Portrait), and the face
data every face method trains on.

What trains is what the official FaceID models carry: the projection (``image_proj``), every cross-attention
layer's ``to_k_ip`` / ``to_v_ip`` (starting as copies of the text ``to_k`` / ``to_v``) and, except for
Portrait, LoRA on the q/k/v/out projections of *every* attention layer (``--lora-rank``, 128 officially;
the up-projections start at zero so training starts from the base model). The base model and, for Plus,
the CLIP image encoder are frozen. ``--init-from`` starts from a released FaceID file instead, LoRA included
(its rank must be the run's ``--lora-rank``; see :func:`~idcraft.training.ip_adapter.adapter_from_file`).

Conditioning follows the registry's method description, as at inference (:func:`idcraft.conditioning.identity_tokens`):

* the identity is the ArcFace embedding of the reference face, L2-normalised; several reference photos of
  one person are averaged (normalised mean) except for Portrait, which gives each photo its own 16 tokens;
* FaceID-Plus also reads CLIP features of the face aligned to the ArcFace template
  (:func:`~idcraft.conditioning.faceid_plus_crop`); PlusV2 adds the identity tokens back (``s_scale`` 1);
* a dropped image (classifier-free guidance) is a zero identity embedding and, for Plus, the encoder's
  features of an all-zero pixel tensor: the unconditional branch of inference.

Face data (:class:`FaceTable`) is computed before the first step: embeddings and keypoints come from the
manifest when it gives them (``embedding`` .npy files, ``kps``), else from face analysis of the photos with
``--face-backend`` / ``--face-models`` (ArcFace required), cached per photo under the run's cache folder and
reused by later runs and resumes. A sample whose face cannot be found, or whose embedding is unusable, is
skipped when it is loaded and listed in ``skipped.txt`` with the reason; it never stops the run.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..adapter import IPAdapter
from ..encoders import ClipImageEncoder
from ..errors import FaceError, IdcraftError
from ..models import load_image_encoder
from ..registry import FACE_EMBEDDING_DIM, Method, get_method
from .cache import claim_cache_dir
from .config import TrainConfig
from .data import CropGeometry, Record, list_records
from .diffusion import UNetDiffusionRecipe
from .ip_adapter import adapter_from_file, preview_images
from .recipe import adapter_checkpoint, export_tensors, register_adapter, register_recipe, write_adapter

log = logging.getLogger(__name__)

#: Reference photos per sample that condition one image at most (FaceID-Portrait's official maximum).
MAX_REFERENCES = 5


# ---------------------------------------------------------------------------- face data
def _file_key(path: str) -> str:
    """Identity of a photo for the face cache: path, size and modification time (an edited file is
    analysed again)."""
    p = Path(path)
    try:
        st = p.stat()
        ident = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        ident = f"{p}|missing"
    return hashlib.sha1(ident.encode()).hexdigest()


def record_key(record: Record) -> tuple[str, tuple[str, ...]]:
    """How :class:`FaceTable` names a sample (its target and references)."""
    return (record.image, record.reference_paths[:MAX_REFERENCES])


class FaceAnalysisCache:
    """Face analysis of photos, one small ``.npz`` per photo (raw embedding and keypoints of the largest
    face, in the upright image; or the reason no face was found) under ``directory``, written atomically, so a killed run keeps what it
    analysed. ``meta.json`` records the backend and models; another one empties the folder."""

    def __init__(self, directory: Path, backend: str, models: str | None):
        self.directory = Path(directory)
        self.backend = backend
        self.models = models
        self.fingerprint = {
            "backend": backend,
            "models": str(Path(models).expanduser().resolve()) if models else None,
        }
        self._analyser = None

    def prepare(self) -> None:
        claim_cache_dir(self.directory, self.fingerprint, "*.npz")

    def path(self, photo: str) -> Path:
        return self.directory / f"{_file_key(photo)}.npz"

    def analyser(self):
        """The face analyser, built on first use; it must give ArcFace embeddings."""
        if self._analyser is None:
            from ..faces import ARCFACE, shared_face_analyser

            options = {"models_dir": self.models} if self.backend != "default" else {}
            analyser = shared_face_analyser(self.backend, **options)
            if analyser.embedding_kind != ARCFACE:
                raise FaceError(
                    f"--face-backend {self.backend} gives {analyser.embedding_kind or 'no'} embeddings, but "
                    "FaceID and InstantID were trained on ArcFace: use --face-backend insightface with "
                    "--face-models DIR (an antelopev2 or buffalo_l pack), or give precomputed ArcFace "
                    '"embedding" files (and "kps") in the JSONL manifest.'
                )
            self._analyser = analyser
        return self._analyser

    def build(self, photos: Sequence[str]) -> None:
        """Analyse every photo not cached yet."""
        from ..faces import analyse_reference

        missing = [p for p in dict.fromkeys(photos) if not self.path(p).is_file()]
        if not missing:
            return
        log.info("analysing faces in %d photo(s)", len(missing))
        analyser = self.analyser()  # a wrong backend is the run's error, not each photo's
        for photo in missing:
            try:
                face = analyse_reference(photo, analyser, 0)  # a training photo: its largest face
                arrays = {
                    "embedding": np.asarray(face.embedding, np.float32),
                    "kps": np.asarray(face.kps, np.float32),
                }
            except (FaceError, IdcraftError, OSError) as exc:  # no face, unreadable: recorded, skipped later
                arrays = {"error": np.asarray(str(exc))}
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            path = self.path(photo)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(path)

    def read(self, photo: str) -> dict:
        with np.load(self.path(photo)) as data:
            return {k: data[k] for k in data.files}


class FaceTable:
    """Per sample: the raw ArcFace embedding of each reference photo, the keypoints of each reference
    (FaceID-Plus crops) and of the target image (InstantID draws them), or the reason it cannot train.

    Built once before training (:meth:`build`); picklable, for data workers.
    """

    def __init__(self, entries: dict[tuple[str, tuple[str, ...]], dict | str]):
        self.entries = entries

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        method: Method,
        *,
        reference_kps: bool = False,
        target_kps: bool = False,
    ) -> FaceTable:
        """Face data for every sample of ``config.data``. Face analysis runs on the main process only,
        for the photos whose data the manifest does not give; the other processes wait and read the cache."""
        from accelerate import PartialState

        records, _ = list_records(config.data)
        plans = {record_key(r): _plan(r, reference_kps, target_kps) for r in records}
        photos = [p for plan in plans.values() for p in plan["analyse"]]
        cache = FaceAnalysisCache(config.feature_cache_dir / "faces", config.face_backend, config.face_models)
        state = PartialState()
        if photos and state.is_main_process:
            cache.prepare()
            cache.build(photos)
        state.wait_for_everyone()
        entries: dict = {}
        for key, plan in plans.items():
            try:
                entries[key] = _assemble(plan, cache, method)
            except FaceError as exc:
                entries[key] = str(exc)
        return cls(entries)

    def __getitem__(self, record: Record) -> dict:
        entry = self.entries.get(record_key(record))
        if entry is None:
            raise FaceError(f"{record.image}: no face data (the data changed after training started).")
        if isinstance(entry, str):
            raise FaceError(entry)
        return entry

    def usable(self) -> int:
        return sum(not isinstance(e, str) for e in self.entries.values())


def _plan(record: Record, reference_kps: bool, target_kps: bool) -> dict:
    """Which data of ``record`` comes from the manifest and which photos need face analysis."""
    references = list(record.reference_paths[:MAX_REFERENCES])
    given = record.face.get("embedding")
    kps = record.face.get("kps")
    analyse: list[str] = []
    if given is None or (reference_kps and not (kps is not None and references == [record.image])):
        analyse += references
    if target_kps and kps is None:
        analyse.append(record.image)
    return {"record": record, "references": references, "analyse": analyse}


def _assemble(plan: dict, cache: FaceAnalysisCache, method: Method) -> dict:
    from ..faces import require_arcface

    record: Record = plan["record"]
    references: list[str] = plan["references"]
    analysed = {p: cache.read(p) for p in dict.fromkeys(plan["analyse"])}
    for data in analysed.values():
        if "error" in data:
            raise FaceError(str(data["error"]))
    given = record.face.get("embedding")
    if given is not None:
        if len(given) != len(references):
            raise FaceError(
                f"{record.image}: {len(given)} embedding file(s) for {len(references)} reference photo(s)."
            )
        raw = [np.load(p) for p in given]
    else:
        raw = [analysed[p]["embedding"] for p in references]
    embeddings = [require_arcface(np.asarray(e, np.float32).reshape(-1), method.name) for e in raw]
    if any(not np.isfinite(e).all() or not np.any(e) for e in embeddings):
        raise FaceError(f"{record.image}: an identity embedding is all zeros or not finite.")
    entry: dict = {"embeddings": np.stack(embeddings).astype(np.float32), "references": references}
    kps = record.face.get("kps")
    entry["reference_kps"] = [
        np.asarray(kps, np.float32)
        if p == record.image and kps is not None and p not in analysed
        else analysed[p]["kps"]
        if p in analysed
        else None
        for p in references
    ]
    if kps is not None:
        entry["target_kps"] = np.asarray(kps, np.float32)
    elif record.image in analysed:
        entry["target_kps"] = analysed[record.image]["kps"]
    return entry


class FacePreprocess:
    """Sample -> identity tensors, in data workers (picklable): ``face_embeds`` ``[slots, 512]`` as the
    method feeds them (normalised or raw; averaged into one slot for ``combine="average"``), for
    FaceID-Plus ``clip_pixels`` ``[slots, 3, 224, 224]`` of the aligned crops, and for InstantID
    ``control``, the keypoint image of the target's face in the training crop (``[3, R, R]`` in [0, 1]).

    Several references are repeated cyclically to ``slots`` (the most any sample has), so that samples
    stack into one batch; with one reference per sample (the usual data) nothing is repeated.
    """

    def __init__(
        self,
        table: FaceTable,
        method: Method,
        slots: int,
        clip_processor=None,
        control: bool = False,
    ):
        self.table = table
        self.method = method
        self.slots = slots
        self.clip_processor = clip_processor
        self.control = control

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        raise IdcraftError(
            f"{self.method.name} training reads precomputed face data per sample, not single images "
            "(--cache-features is not used by face methods: their face data is always cached)."
        )

    def _cycle(self, items: list) -> list:
        return [items[i % len(items)] for i in range(self.slots)]

    def record_inputs(self, record: Record, geometry: CropGeometry) -> dict[str, torch.Tensor]:
        entry = self.table[record]
        vectors = torch.from_numpy(entry["embeddings"])
        if self.method.normalize_embedding:
            vectors = torch.nn.functional.normalize(vectors, dim=1)
        if self.method.combine == "average":
            mean = vectors.mean(0, keepdim=True)
            vectors = torch.nn.functional.normalize(mean, dim=1) if self.method.normalize_embedding else mean
        else:
            vectors = torch.stack(self._cycle(list(vectors)))
        out = {"face_embeds": vectors.contiguous()}
        if self.clip_processor is not None:
            out["clip_pixels"] = self._crops(record, entry)
        if self.control:
            out["control"] = self._keypoint_image(record, entry, geometry)
        return out

    def _crops(self, record: Record, entry: dict) -> torch.Tensor:
        from ..conditioning import faceid_plus_crop
        from ..images import load_image

        crops = []
        for photo, kps in zip(entry["references"], entry["reference_kps"], strict=True):
            if kps is None:
                raise FaceError(f"{photo}: no face keypoints for the FaceID-Plus crop.")
            crops.append(faceid_plus_crop(load_image(photo), kps))
        pixels = self.clip_processor(images=crops, return_tensors="pt").pixel_values
        return torch.stack(self._cycle(list(pixels)))

    def _keypoint_image(self, record: Record, entry: dict, geometry: CropGeometry) -> torch.Tensor:
        from ..faces import draw_kps

        if "target_kps" not in entry:
            raise FaceError(f"{record.image}: no face keypoints for the IdentityNet condition.")
        kps = geometry.to_crop(entry["target_kps"])
        drawn = draw_kps(Image.new("RGB", (geometry.size, geometry.size)), kps)
        array = np.asarray(drawn, dtype=np.float32) / 255.0
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


def reference_slots(config: TrainConfig, method: Method) -> int:
    """How many reference photos a batch carries per sample: 1 where they are averaged into one
    embedding (FaceID, InstantID) and no crops are read, else the most any sample lists (at most 5)."""
    if method.combine == "average" and method.inputs == "face":
        return 1
    records, _ = list_records(config.data)
    return max([1, *(min(len(r.reference_paths), MAX_REFERENCES) for r in records)])


# ---------------------------------------------------------------------------- the model
class FaceIDDenoiser(nn.Module):
    """UNet + FaceID adapter as one module (for ``accelerate.prepare``): identity embeddings (and for Plus,
    crop features) -> tokens appended to the text, as at inference."""

    def __init__(self, unet: nn.Module, adapter: IPAdapter):
        super().__init__()
        self.unet = unet
        register_adapter(self, adapter, "image_proj")  # its attention processors are in the denoiser

    def tokens(self, condition: dict) -> torch.Tensor:
        """``{"embeds": [B, S, 512], "clip": [B, N, width] or None}`` -> ``[B, tokens, cross]``."""
        proj = self.adapter.image_proj
        dtype = next(proj.parameters()).dtype
        embeds = condition["embeds"].to(dtype)
        batch, slots, width = embeds.shape
        clip = condition.get("clip")
        if clip is not None:  # FaceID-Plus: one (averaged) identity queries all crops' CLIP tokens
            method = self.adapter.method
            return proj(embeds[:, 0], clip.to(dtype), shortcut=method.shortcut, s_scale=1.0)
        tokens = proj(embeds.reshape(batch * slots, width))
        return tokens.reshape(batch, -1, tokens.shape[-1])  # Portrait: each photo's tokens side by side

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        condition: dict,
        added: dict | None = None,
    ) -> torch.Tensor:
        tokens = self.tokens(condition)
        self.adapter.layout.num_tokens = tokens.shape[1]
        hidden = torch.cat([text, tokens.to(text.dtype)], dim=1)
        return self.unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


# ---------------------------------------------------------------------------- the recipe
class FaceRecipeBase(UNetDiffusionRecipe):
    """What FaceID and InstantID share: the face table, identity drops, the adapter's files."""

    encoder: ClipImageEncoder | None = None
    adapter: IPAdapter
    faces: FaceTable

    def _load_faces(self, *, reference_kps: bool = False, target_kps: bool = False) -> None:
        self.faces = FaceTable.build(
            self.config, self.method, reference_kps=reference_kps, target_kps=target_kps
        )
        if not self.faces.usable():
            raise IdcraftError(
                f"--data {self.config.data}: no sample has a usable face; e.g. "
                f"{next(iter(self.faces.entries.values()), 'no samples')}"
            )
        self.slots = reference_slots(self.config, self.method)

    def cache_fingerprint(self) -> dict | None:
        return None  # face data is always cached (FaceTable); CLIP crop features are not

    def _embeds(self, batch: dict, drop_image: torch.Tensor) -> torch.Tensor:
        """Identity embeddings ``[B, S, 512]``, zero for dropped samples (the unconditional branch)."""
        embeds = batch["face_embeds"].to(self.device)
        keep = ~drop_image.to(self.device).view(-1, 1, 1)
        return embeds * keep.to(embeds.dtype)

    def _export_adapter(
        self,
        directory: Path,
        formats: Sequence[str],
        metadata: dict[str, str],
        state: Mapping[str, torch.Tensor],
    ) -> list[Path]:
        """The adapter file(s) from ``state``, the adapter module's tensors (``image_proj.*``,
        ``layers.*``)."""
        checkpoint = adapter_checkpoint(export_tensors(state, self.config.export_dtype))
        return write_adapter(checkpoint, directory, formats, {"method": self.method.name, **metadata})


@register_recipe
class FaceIDRecipe(FaceRecipeBase):
    """IP-Adapter-FaceID family: ArcFace identity (+ CLIP face crop for Plus) -> tokens, LoRA on the UNet."""

    methods = ("faceid", "faceid-plus", "faceid-plusv2", "faceid-portrait")

    def build(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.method = method = get_method(self.config.method)
        clip_width = None
        if method.needs_image_encoder:
            if not self.config.image_encoder:
                raise IdcraftError(
                    f"{method.name} training needs --image-encoder: the CLIP image encoder folder the "
                    "adapter will be used with (models/image_encoder of h94/IP-Adapter)."
                )
            self.encoder = ClipImageEncoder(
                load_image_encoder(self.config.image_encoder, device=device, dtype=weight_dtype)
            )
            clip_width = self.encoder.config.hidden_size
        self.load_base(device, weight_dtype)
        if self.config.init_from:
            adapter = adapter_from_file(
                self.config,
                method,
                self.unet,
                embed_dim=FACE_EMBEDDING_DIM,
                encoder_config=self.encoder.config if self.encoder is not None else None,
                lora_rank=self.config.lora_rank if method.lora else None,
            )
        else:
            adapter = IPAdapter.for_unet(
                self.unet,
                method,
                FACE_EMBEDDING_DIM,
                num_tokens=self.config.num_tokens,
                clip_embed_dim=clip_width,
                lora_rank=self.config.lora_rank,
            )
        adapter.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        adapter.attach(self.unet)
        self.adapter = adapter
        self.model = FaceIDDenoiser(self.unet, adapter)
        self._load_faces(reference_kps=method.inputs == "face+image")
        self.null_clip = self._null_clip() if self.encoder is not None else None

    @torch.no_grad()
    def _null_clip(self) -> torch.Tensor:
        """CLIP features of an all-zero (normalised) pixel tensor: a dropped face crop, ``[1, N, width]``."""
        size = self.encoder.processor.crop_size
        zeros = torch.zeros(1, 3, size["height"], size["width"], device=self.device, dtype=self.encoder.dtype)
        return self.encoder.features(zeros, "penultimate")

    # ------------------------------------------------------------------ parameters
    def frozen_modules(self) -> dict[str, nn.Module]:
        frozen = self.base_modules()
        if self.encoder is not None:
            frozen["image_encoder"] = self.encoder.model
        return frozen

    # ------------------------------------------------------------------ data
    def reference_preprocessor(self) -> FacePreprocess:
        processor = self.encoder.processor if self.encoder is not None else None
        return FacePreprocess(self.faces, self.method, self.slots, clip_processor=processor)

    @torch.no_grad()
    def encode_references(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """CLIP features of the aligned crops ``[B, S, 3, 224, 224]`` -> ``[B, S * N, width]``."""
        pixels = inputs["clip_pixels"].to(self.device, dtype=self.encoder.dtype)
        batch, slots = pixels.shape[:2]
        features = self.encoder.features(pixels.flatten(0, 1), "penultimate")
        return features.reshape(batch, slots * features.shape[1], features.shape[2])

    def condition(self, batch: dict, drop_image: torch.Tensor) -> dict:
        condition: dict = {"embeds": self._embeds(batch, drop_image), "clip": None}
        if self.encoder is not None:
            features = self.encode_references(batch)
            null = self.null_clip.to(features.dtype).repeat(1, self.slots, 1).expand_as(features)
            mask = drop_image.to(self.device).view(-1, 1, 1)
            condition["clip"] = torch.where(mask, null, features)
        return condition

    # ------------------------------------------------------------------ results
    def export(
        self,
        directory: Path,
        formats: Sequence[str],
        metadata: dict[str, str],
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> list[Path]:
        state = self.trainable_state_dict() if state is None else state
        return self._export_adapter(directory, formats, metadata, state)

    @torch.no_grad()
    def sample(
        self, prompt: str, reference: str, *, seed: int, steps: int, guidance: float
    ) -> list[Image.Image]:
        """Generate with a copy of the adapter (see :meth:`IPAdapterRecipe.sample`), the reference's
        identity found with the run's face backend."""
        return preview_images(
            self.adapter,
            self.pipe,
            prompt,
            reference,
            self.resolution,
            encoder=self.encoder,
            seed=seed,
            steps=steps,
            guidance=guidance,
            face_backend=self.config.face_backend,
            face_models=self.config.face_models,
        )
