"""InstantCharacter (Tencent) on diffusers' ``FluxPipeline``: one reference image of a character, any prompt.

Modules, following the data: :mod:`.encoders` (SigLIP + DINOv2 features at 384 and as four tiles of 768),
:mod:`.projector` (cross-layer / cross-scale refinement and the timestep-conditioned resampler),
:mod:`.processors` (the subject attention on every FLUX block), :mod:`.adapter` (official checkpoint in and
out, compatibility, attach), :mod:`.pipeline` (generation, offloading) and :mod:`.memory` (what a run needs,
estimated before loading).
"""
