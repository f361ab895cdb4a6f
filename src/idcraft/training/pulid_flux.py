"""Training recipe for PuLID-FLUX on a frozen FLUX.1 base: flow-matching loss plus PuLID's alignment loss.

What trains: the IDFormer (``pulid_encoder``) and the ID cross-attention modules (``pulid_ca``) after every
2nd double and 4th single block. Frozen: the FLUX transformer, the VAE, both text encoders, the EVA02-CLIP
tower (``--image-encoder``: the eva_clip checkpoint) and BiSeNet (``--image-encoder-2``: facexlib's
``parsing_bisenet.pth``).

Data: a ``.jsonl`` manifest whose lines give the target ``image``, its ``text``, the ``reference`` face photo,
its RAW antelopev2 ``embedding`` (``.npy``, as ``idcraft faces --save-embeddings`` writes it) and the face's
five ``kps`` in the reference (the face is aligned from them; without ``kps`` the reference must already be
the 512x512 aligned face). ``extra["face_parsing"] = "none"`` skips BiSeNet and greys the whole face (not the
official preprocessing; for tests and parser-less set-ups).

Objective, per batch:

1. the flow-matching loss of the InstantCharacter recipe (same latents, noise levels, packing, text, FLUX
   guidance embedding; :class:`~idcraft.training.instantcharacter.InstantCharacterRecipe`), the prediction
   made with the ID tokens (a sample whose reference is dropped runs without them, weight 0);
2. PuLID's alignment loss (paper, section 3.2): the same noisy latents and prompt through the transformer
   again *without* the ID tokens (no gradient), and at every injection point

   * layout: ``|| Q_id - Q ||^2`` -- the image stream with the identity should keep the layout it has
     without it;
   * semantic: ``|| softmax(K Q_id^T / sqrt(d)) Q_id - softmax(K Q^T / sqrt(d)) Q ||^2`` with ``K`` the
     block's text stream (without ID) -- each word should pick the same image features with and without
     the identity;

   weighted ``align_sem`` (0.6) and ``align_layout`` (0.1) as in the paper. The paper aligns along a fast
   (Lightning) sampling path from pure noise; here the diffusion branch's noisy latents stand in for it.

The result is ``OUTPUT/adapter.safetensors`` in the release layout (``pulid_encoder.*``, ``pulid_ca.{i}.*``),
which ``idcraft generate --method pulid-flux`` loads. ``--init-from`` starts from a release file.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FaceError, IdcraftError
from .instantcharacter import InstantCharacterRecipe
from .recipe import export_tensors, register_recipe

SETTINGS = (
    "guidance",
    "timestep_density",
    "logit_mean",
    "logit_std",
    "max_sequence_length",
    "idformer",
    "ca_heads",
    "align_sem",
    "align_layout",
    "face_parsing",
)
#: The paper's alignment weights.
ALIGN_SEM = 0.6
ALIGN_LAYOUT = 0.1
DEFAULT_MAX_SEQUENCE_LENGTH = 128


class PulidFacePreprocess:
    """Record -> ``{"face": [3, 512, 512] in [0, 1], "embedding": [512]}`` (picklable, for data workers)."""

    def __call__(self, image) -> dict[str, torch.Tensor]:
        raise IdcraftError(
            "pulid-flux training reads each record's embedding and keypoints: use a .jsonl manifest."
        )

    def record_inputs(self, record, geometry) -> dict[str, torch.Tensor]:
        from ..images import load_image
        from ..pulid import preprocess

        paths = record.face.get("embedding")
        if not paths:
            raise FaceError(
                f"{record.image}: no face embedding; pulid-flux training needs the reference's raw antelopev2 "
                'embedding as "embedding" in the manifest.'
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


class PulidFluxDenoiser(nn.Module):
    """FLUX transformer + IDFormer + ID cross-attention as one module (what ``accelerate.prepare`` wraps):
    ID tokens with gradient, the prediction with them, and the alignment features."""

    def __init__(self, transformer: nn.Module, adapter):
        super().__init__()
        self.transformer = transformer
        self.pulid_encoder = adapter.pulid_encoder
        self.pulid_ca = adapter.pulid_ca
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        config = transformer.config
        from ..pulid.flux import injection_points

        blocks = {"double": transformer.transformer_blocks, "single": transformer.single_transformer_blocks}
        for kind, index in injection_points(config.num_layers, config.num_single_layers):
            # Registered after the injection's own hooks: they see the block output with the identity added.
            blocks[kind][index].register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple, output: tuple) -> None:
        if self._capturing:
            self._captured.append(output)

    _capturing = False

    def forward(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor,
        text_ids: torch.Tensor,
        image_ids: torch.Tensor,
        guidance: torch.Tensor | None,
        id_cond: torch.Tensor,
        hidden: list[torch.Tensor],
        keep: torch.Tensor,
        align: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(prediction, semantic alignment loss, layout alignment loss)``; the alignment terms are 0
        when ``align`` is false."""
        from ..pulid.flux import id_call

        dtype = self.pulid_encoder.latents.dtype
        tokens = self.pulid_encoder(id_cond.to(dtype), [h.to(dtype) for h in hidden]).to(latents.dtype)
        weight = keep.to(latents.dtype).view(-1, 1, 1)
        inputs = dict(
            hidden_states=latents,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=sigmas,
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=guidance,
            return_dict=False,
        )
        self._captured, self._capturing = [], align
        try:
            with id_call(self.pulid_ca.call(tokens, weight)):
                prediction = self.transformer(**inputs)[0]
            with_id, self._captured = self._captured, []
            zero = prediction.new_zeros(())
            if not align:
                return prediction, zero, zero
            with torch.no_grad():
                self.transformer(**inputs)
            without = self._captured
        finally:
            self._captured, self._capturing = [], False
        sem, layout = zero, zero
        mask = keep.to(prediction.dtype)
        for (_, image_id), (text_base, image_base) in zip(with_id, without, strict=True):
            layout = layout + _per_sample_mse(image_id, image_base, mask)
            sem = sem + _per_sample_mse(
                _word_response(text_base, image_id), _word_response(text_base, image_base), mask
            )
        count = max(len(with_id), 1)
        return prediction, sem / count, layout / count


def _word_response(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``softmax(K Q^T / sqrt(d)) Q``: for each text token, the image features it attends to."""
    weights = torch.softmax(
        (text.float() @ image.float().transpose(1, 2)) / math.sqrt(image.shape[-1]), dim=-1
    )
    return weights @ image.float()


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the samples with ``mask`` 1 (0 when there are none)."""
    per = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (per * mask).sum() / mask.sum().clamp(min=1)


@register_recipe
class PulidFluxRecipe(InstantCharacterRecipe):
    """PuLID-FLUX on FLUX.1 (see the module docstring). The flow-matching helpers (latents, text, noise
    levels) are InstantCharacter's: the same FLUX objective."""

    methods = ("pulid-flux",)

    # ------------------------------------------------------------------ modules
    def build(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        from ..pulid.encoder import PulidEncoder
        from ..pulid.eva_clip import load_eva_tower
        from ..pulid.flux_pipeline import _is_sd_base

        config = self.config
        self.check_extra(SETTINGS)
        if not config.image_encoder:
            raise IdcraftError(
                "pulid-flux training needs --image-encoder EVA02_CLIP_L_336_psz14_s6B.pt (the EVA02-CLIP tower)."
            )
        sd_class = _is_sd_base(config.base)
        if sd_class is not None:
            raise IdcraftError(f"pulid-flux trains on FLUX.1; base model {config.base} is a {sd_class}.")
        self.parsing = str(config.extra.get("face_parsing", "bisenet"))
        if self.parsing not in ("bisenet", "none"):
            raise IdcraftError(f"face_parsing must be bisenet or none (got {self.parsing!r}).")
        eva = load_eva_tower(config.image_encoder).to(device, weight_dtype).requires_grad_(False).eval()
        parser = None
        if self.parsing == "bisenet":
            if not config.image_encoder_2:
                raise IdcraftError(
                    "pulid-flux training parses faces with BiSeNet: pass --image-encoder-2 parsing_bisenet.pth, "
                    'or set extra face_parsing: "none".'
                )
            try:
                from ..pulid.bisenet import load_bisenet
            except ImportError as exc:
                raise IdcraftError(
                    "BiSeNet is not available in this build; set extra face_parsing: none."
                ) from exc
            parser = (
                load_bisenet(config.image_encoder_2).to(device, weight_dtype).requires_grad_(False).eval()
            )

        self.load_frozen_flux(device, weight_dtype)
        pipe = self.pipe

        adapter = self._adapter(eva)
        adapter.pulid_ca.check_compatible(pipe.transformer, f"base model {config.base}")
        adapter.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        adapter.pulid_ca.attach(pipe.transformer)
        self.adapter = adapter
        self.encoder = PulidEncoder(adapter.pulid_encoder, eva, parser)
        self.model = PulidFluxDenoiser(pipe.transformer, adapter)

    def _adapter(self, eva):
        from ..pulid.flux import PulidFluxInjection
        from ..pulid.flux_pipeline import PulidFluxAdapter
        from ..pulid.idformer import IDFormer

        config = self.config
        if config.init_from:
            adapter = PulidFluxAdapter.from_file(config.init_from)
            if adapter.pulid_encoder is None:
                raise IdcraftError(f"--init-from {config.init_from}: no pulid_encoder.* (IDFormer) tensors.")
            return adapter.float()
        settings = {"id_dim": 512 + eva.config.embed_dim, "vit_dim": eva.config.width}
        settings.update(config.extra.get("idformer", {}))  # e.g. a small IDFormer for tests
        id_former = IDFormer(**settings)
        heads = int(config.extra.get("ca_heads", 16))
        injection = PulidFluxInjection.for_transformer(
            self.pipe.transformer, id_former.config.output_dim, heads
        )
        return PulidFluxAdapter(injection, id_former)

    @property
    def resolution(self) -> int:
        return self.config.resolution or 1024

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    def frozen_modules(self) -> dict[str, nn.Module]:
        names = ("transformer", "vae", "text_encoder", "text_encoder_2")
        frozen = {n: getattr(self.pipe, n) for n in names}
        frozen["eva_clip"] = self.encoder.eva
        if isinstance(self.encoder.parser, nn.Module):
            frozen["face_parser"] = self.encoder.parser
        return frozen

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.adapter.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.adapter.load_state_dict(state, strict=True)

    # ------------------------------------------------------------------ data
    def reference_preprocessor(self) -> PulidFacePreprocess:
        return PulidFacePreprocess()

    @torch.no_grad()
    def encode_references(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Faces and embeddings -> ``[B, R + 5 T, W]``: the identity vector (raw embedding ++ normalised
        EVA class token) in ``R`` rows of the tower's width ``W``, then the five hidden states."""
        from ..pulid import preprocess

        face = inputs["face"].to(self.device, torch.float32)
        if self.parsing == "none":
            labels = torch.ones(face.shape[0], 1, *face.shape[-2:], dtype=torch.long, device=face.device)
        else:
            labels = self.encoder.labels(face)
        cls, hidden = self.encoder.vision(preprocess.face_features_image(face, labels))
        id_cond = torch.cat([inputs["embedding"].to(cls.device, cls.dtype), cls], dim=-1)
        width = hidden[0].shape[-1]
        rows = -(-id_cond.shape[1] // width)
        padded = F.pad(id_cond, (0, rows * width - id_cond.shape[1])).view(-1, rows, width)
        return torch.cat([padded, *hidden], dim=1)

    def _unpack(self, features: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        id_dim = self.adapter.pulid_encoder.config.id_dim
        scales = self.adapter.pulid_encoder.config.num_scales
        width = features.shape[-1]
        rows = -(-id_dim // width)
        id_cond = features[:, :rows].flatten(1)[:, :id_dim]
        hidden = list(features[:, rows:].chunk(scales, dim=1))
        return id_cond, hidden

    def cache_fingerprint(self) -> dict | None:
        return {
            "recipe": "pulid-flux",
            "eva_clip": str(self.config.image_encoder),
            "face_parser": str(self.config.image_encoder_2),
            "face_parsing": self.parsing,
            "dtype": str(self.weight_dtype),
        }

    # ------------------------------------------------------------------ objective
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = int(self.config.extra.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
        text, pooled, text_ids = self.pipe.encode_prompt(
            prompt=captions, prompt_2=captions, device=self.device, max_sequence_length=length
        )
        return text.to(self.weight_dtype), pooled.to(self.weight_dtype), text_ids

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        extra = self.config.extra
        drop_image, captions = self.caption_drops(batch, generator)
        latents, noise, sigmas = self.noised_latents(batch, generator)
        flow = self.flow_inputs(latents, noise, sigmas, captions)
        features = batch["features"].to(self.device) if "features" in batch else self.encode_references(batch)
        id_cond, hidden = self._unpack(features)
        keep = ~drop_image.to(self.device)
        sem_weight = float(extra.get("align_sem", ALIGN_SEM))
        layout_weight = float(extra.get("align_layout", ALIGN_LAYOUT))
        prediction, sem, layout = model(
            flow.packed,
            sigmas.to(self.weight_dtype),
            flow.text,
            flow.pooled,
            flow.text_ids,
            flow.image_ids,
            flow.guidance,
            id_cond,
            hidden,
            keep,
            sem_weight > 0 or layout_weight > 0,
        )
        return self.flow_loss(prediction, flow, batch) + sem_weight * sem + layout_weight * layout

    # ------------------------------------------------------------------ results
    def export(
        self,
        directory: Path,
        formats: Sequence[str],
        metadata: dict[str, str],
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> list[Path]:
        """``adapter.safetensors`` (and ``adapter.bin``) in the release layout: ``pulid_encoder.*`` then
        ``pulid_ca.{i}.*``."""
        from safetensors.torch import save

        from ..outputs import atomic_write_bytes

        state = self.trainable_state_dict() if state is None else state
        tensors = export_tensors(state, self.config.export_dtype)
        release = {}
        for key, tensor in tensors.items():
            if key.startswith("pulid_ca.ca."):
                release["pulid_ca." + key.removeprefix("pulid_ca.ca.")] = tensor
            elif key.startswith("pulid_encoder."):
                release[key] = tensor
            else:
                raise IdcraftError(f"unexpected trained tensor {key!r} (not pulid_encoder.* or pulid_ca.*).")
        info = {"method": "pulid-flux", **{k: str(v) for k, v in metadata.items()}}
        written = []
        for fmt in formats:
            if fmt == "safetensors":
                data = save(release, metadata=info)
                written.append(atomic_write_bytes(Path(directory) / "adapter.safetensors", data))
            else:
                buffer = io.BytesIO()
                torch.save(release, buffer)
                written.append(atomic_write_bytes(Path(directory) / "adapter.bin", buffer.getvalue()))
        return written
