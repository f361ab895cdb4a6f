"""PuLID's accurate-ID loss (paper section 3.3) for the SDXL recipe: ``idcraft train --method pulid --id-loss W``.

The diffusion loss sees the identity only through one denoising step of a noised training image; the paper
adds a loss on what the model actually *generates*: from pure noise, a fast sampling path (SDXL-Lightning,
4 steps) runs with the ID tokens and gradients, the VAE decodes its result, the generated face is aligned
and embedded with a face recogniser, and ``1 - cos(embedding(generated), embedding(reference))`` is
minimised. Here:

* **Fast path** -- the frozen base UNet itself, ``extra["id_loss_steps"]`` (4) deterministic steps at the
  trailing timesteps Lightning expects (999, 749, 499, 249 for 4 of 1000), CFG 1, the batch's own prompts
  and SDXL time ids, the sample's ID tokens with gradient. The update is the Euler step of Lightning's
  ``EulerDiscreteScheduler`` (trailing spacing), written in DDIM's form: for an epsilon or v prediction on
  the discrete schedule both give ``x' = sqrt(a') x0 + sqrt(1 - a') eps``, starting from
  ``sqrt(1 - a_T) * noise`` and ending at the last ``x0``. A plain SDXL base makes a poor 4-step sampler:
  train on an SDXL-Lightning base (or one with the Lightning weights merged) for a meaningful loss.
* **Noise** -- one standard-normal tensor of the latents' shape per batch, drawn from the recipe's
  generator (on the CPU) right after the diffusion branch's draws, for every sample whether or not it keeps
  its identity: the draw order is fixed, so runs and resumed runs are reproducible.
* **Faces** -- the 5 keypoints of the generated face are found on the *detached* decoded image with the
  run's face backend (``--face-backend``, ``--face-models``; its largest face), the similarity transform
  to the ArcFace 112 template is estimated as insightface's ``norm_crop`` does, and the warp itself runs
  differentiably (``affine_grid`` + ``grid_sample``, bilinear, black border, as ``cv2.warpAffine``). The
  recogniser is facexlib's IR-SE-50 ArcFace (:mod:`idcraft.infiniteyou.recognition`, BGR crops in
  [-1, 1]). A sample whose generated image shows no face adds 0.
* **Reference** -- the same recogniser on the reference's 512 aligned face (FFHQ template of
  :mod:`idcraft.pulid.preprocess`), warped to the ArcFace template, without gradient.

Only samples that keep their identity run the path; the loss is ``weight * mean(1 - cos)`` over them.

Memory: the backward pass keeps the activations of ``id_loss_steps`` UNet passes and of the VAE decoder
at the training resolution -- use ``--gradient-checkpointing`` (it then checkpoints the decoder too).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IdcraftError

log = logging.getLogger(__name__)

#: Steps of the fast sampling path (SDXL-Lightning's 4-step model).
ID_LOSS_STEPS = 4
#: ``extra`` settings of the accurate-ID loss.
ID_LOSS_SETTINGS = ("id_loss_steps",)
#: ArcFace's crop size.
CROP = 112


def trailing_timesteps(steps: int, train_timesteps: int = 1000) -> tuple[int, ...]:
    """The ``steps`` timesteps of diffusers' ``trailing`` spacing, highest first (4 of 1000: 999, 749, 499,
    249), which the Lightning models were distilled for."""
    if steps < 1:
        raise IdcraftError(f"id_loss_steps must be at least 1 (got {steps}).")
    ratio = train_timesteps / steps
    return tuple(int(round(train_timesteps - i * ratio)) - 1 for i in range(steps))


@dataclass(frozen=True)
class FastPath:
    """One batch's fast sampling path: which samples run it (``index`` into the batch), their pure noise,
    prompts and time ids, and the schedule."""

    index: torch.Tensor  # [K] long
    noise: torch.Tensor  # [K, C, h, w]
    text: torch.Tensor
    added: dict | None
    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]
    prediction_type: str


def sample_latents(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], path: FastPath
) -> torch.Tensor:
    """Run ``path`` (see the module docstring) with ``denoise(x_t, t) -> model output``; returns the last
    ``x0`` estimate (float32), differentiable through every step."""
    alphas = path.alphas_cumprod
    x = path.noise.float() * math.sqrt(1.0 - alphas[path.timesteps[0]])
    count = x.shape[0]
    x0 = x
    for i, step in enumerate(path.timesteps):
        a = alphas[step]
        t = torch.full((count,), step, dtype=torch.long, device=x.device)
        out = denoise(x, t).float()
        if path.prediction_type == "v_prediction":
            x0 = math.sqrt(a) * x - math.sqrt(1.0 - a) * out
            eps = math.sqrt(1.0 - a) * x + math.sqrt(a) * out
        else:
            x0 = (x - math.sqrt(1.0 - a) * out) / math.sqrt(a)
            eps = out
        if i + 1 < len(path.timesteps):
            following = alphas[path.timesteps[i + 1]]
            x = math.sqrt(following) * x0 + math.sqrt(1.0 - following) * eps
    return x0


def grid_theta(matrix: np.ndarray, size: tuple[int, int], crop: int = CROP) -> np.ndarray:
    """``affine_grid``'s ``theta`` (output -> input, normalised, ``align_corners=False``) for the 2x3
    ``matrix`` that maps image pixels to crop pixels, as ``cv2.warpAffine(image, matrix, (crop, crop))``
    uses it (pixel centres at integers). ``size`` is the image's ``(height, width)``."""
    height, width = size
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    out_pixels = np.array([[crop / 2, 0, (crop - 1) / 2], [0, crop / 2, (crop - 1) / 2], [0, 0, 1]])
    in_normal = np.array([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])
    return (in_normal @ np.linalg.inv(forward) @ out_pixels)[:2]


def warp_faces(images: torch.Tensor, matrices: np.ndarray, crop: int = CROP) -> torch.Tensor:
    """``images`` ``[B, C, H, W]`` warped by one pixel->crop matrix each (``[B, 2, 3]``) to ``crop``
    pixels square: bilinear, zeros outside -- ``cv2.warpAffine``'s result, differentiable in ``images``."""
    size = tuple(images.shape[-2:])
    theta = torch.from_numpy(np.stack([grid_theta(m, size, crop) for m in matrices]))
    theta = theta.to(images.device, torch.float32)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], crop, crop], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def arcface_embeddings(recogniser: nn.Module, rgb: torch.Tensor, matrices: np.ndarray) -> torch.Tensor:
    """The recogniser's unit embeddings of the faces that ``matrices`` align in ``rgb`` (``[B, 3, H, W]``
    in [0, 1]): the crop of :func:`~idcraft.infiniteyou.recognition.embed_face`, BGR in [-1, 1]."""
    crops = warp_faces(rgb.flip(1), matrices) * 2 - 1
    param = next(recogniser.parameters())
    return recogniser(crops.to(param.dtype)).float()


class IdentityLoss:
    """The accurate-ID loss's frozen parts: the ArcFace recogniser and the face detector. Holds no
    per-batch state."""

    def __init__(self, recogniser: nn.Module, analyser, weight: float, steps: int):
        self.recogniser = recogniser
        self.analyser = analyser
        self.weight = weight
        self.steps = steps

    @classmethod
    def load(cls, config, device: torch.device) -> IdentityLoss:
        """The recogniser (``recognition_arcface_ir_se50.pth`` in ``--face-models`` or ``$IDCRAFT_ARCFACE``)
        in float32 (it is small beside the UNet) and the run's face detector."""
        from ..faces import shared_face_analyser
        from ..infiniteyou.recognition import WEIGHTS_FILE, find_weights, load_recogniser

        steps = int(config.extra.get("id_loss_steps", ID_LOSS_STEPS))
        trailing_timesteps(steps)  # checks the count before anything loads
        if config.cache_features:
            raise IdcraftError(
                "--id-loss embeds each reference's aligned face with ArcFace and the feature cache keeps only "
                "the IDFormer's inputs: train without --cache-features."
            )
        try:
            path = find_weights(config.face_models)
        except IdcraftError:
            raise IdcraftError(
                f"--id-loss embeds faces with facexlib's ArcFace: put {WEIGHTS_FILE} (facexlib v0.1.0 release) "
                "in the --face-models folder or point $IDCRAFT_ARCFACE at it."
            ) from None
        recogniser = load_recogniser(path).to(device, torch.float32).requires_grad_(False).eval()
        options = {"models_dir": config.face_models} if config.face_backend != "default" else {}
        analyser = shared_face_analyser(config.face_backend, **options)
        return cls(recogniser, analyser, float(config.id_loss), steps)

    def path(
        self, noise: torch.Tensor, keep: torch.Tensor, text: torch.Tensor, added: dict | None, scheduler
    ) -> FastPath | None:
        """The fast path of the samples with ``keep`` (None when no sample keeps its identity)."""
        index = keep.nonzero().flatten()
        if index.numel() == 0:
            return None
        device = text.device
        subset = None
        if added is not None:
            subset = {k: v[index.to(v.device)] for k, v in added.items()}
        config = scheduler.config
        return FastPath(
            index=index,
            noise=noise[index.cpu()].to(device),
            text=text[index.to(device)],
            added=subset,
            timesteps=trailing_timesteps(self.steps, int(config.num_train_timesteps)),
            alphas_cumprod=tuple(float(a) for a in scheduler.alphas_cumprod),
            prediction_type=str(config.prediction_type),
        )

    @torch.no_grad()
    def reference_embeddings(self, faces: torch.Tensor) -> torch.Tensor:
        """``[B, 512]`` embeddings of the references' aligned faces (``[B, 3, S, S]`` in [0, 1], aligned on
        the FFHQ template scaled to ``S``)."""
        from ..faces import estimate_norm
        from ..pulid.preprocess import ALIGNED_SIZE, FFHQ_TEMPLATE_512

        size = faces.shape[-1]
        matrix = estimate_norm(FFHQ_TEMPLATE_512 * (size / ALIGNED_SIZE), CROP)
        param = next(self.recogniser.parameters())
        return arcface_embeddings(self.recogniser, faces.to(param.device), np.stack([matrix] * len(faces)))

    @torch.no_grad()
    def keypoints(self, images: torch.Tensor) -> list[np.ndarray | None]:
        """The largest face's 5 keypoints in each image (``[B, 3, H, W]`` in [-1, 1]), None where there is
        no face."""
        from PIL import Image

        pixels = ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        found = []
        for array in pixels.permute(0, 2, 3, 1).cpu().numpy():
            faces = self.analyser.detect(Image.fromarray(array), embed=False)
            found.append(np.asarray(faces[0].kps, np.float32) if faces else None)
        return found

    def distance(
        self, images: torch.Tensor, reference: torch.Tensor, kps: list[np.ndarray | None]
    ) -> tuple[torch.Tensor, int]:
        """``(mean(1 - cos) over the samples, faces found)``: ``images`` ``[B, 3, H, W]`` in [-1, 1] (with
        gradient), ``reference`` ``[B, 512]`` unit embeddings, ``kps`` from :meth:`keypoints`; a sample
        without keypoints adds 0."""
        from ..faces import estimate_norm

        rows = [i for i, points in enumerate(kps) if points is not None]
        total = images.new_zeros((), dtype=torch.float32)
        if rows:
            matrices = np.stack([estimate_norm(kps[i], CROP) for i in rows])
            rgb = ((images[rows].float() + 1) / 2).clamp(0, 1)
            generated = arcface_embeddings(self.recogniser, rgb, matrices)
            cosine = F.cosine_similarity(generated, reference[rows].to(generated.device).float(), dim=-1)
            total = (1 - cosine).sum()
        return total / max(len(kps), 1), len(rows)
