"""InfiniteYou (ByteDance, ICCV 2025) on diffusers' FLUX: an identity branch beside the text path.

The face's 512-d ArcFace embedding becomes 8 identity tokens (a Perceiver Resampler); InfuseNet, a
diffusers ``FluxControlNetModel`` that reads those tokens instead of the text, adds residuals to every
double- and single-stream block of the FLUX transformer at each step, so the prompt's path is untouched.

Modules, following the data: :mod:`.release` (the released folder layout in, widths from the files),
:mod:`.control` (the keypoint control image), :mod:`.pipeline` (generation, the official loop and its
random-number order, offloading), :mod:`.memory` (what a run needs, estimated before loading) and
:mod:`.tiny` (random-weight models for tests).
"""
