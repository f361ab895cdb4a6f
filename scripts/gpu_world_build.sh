#!/usr/bin/env bash
# Rebuild the whole offline-world bundle on one H200 with the "h200" profile, in one command of the device
# tool (docs/world-gpu.md has the exact `run` call):
#
#   bash scripts/gpu_world_build.sh            # run from the repository root; writes to $OUT
#
# 1. installs diffusers (absent on the GPU machine) from the wheel carried in .whl/, with no dependencies,
#    into /tmp/site; the package itself runs from src/ (PYTHONPATH), so nothing else is installed;
# 2. runs `idcraft world build --profile h200 --device cuda --pack $OUT --keep-going`, cut off after
#    BUDGET seconds (default 550, so the tool's 600 s limit keeps a margin); after every finished stage
#    the bundle is repacked into $OUT as float16 archives (at most 7 of at most 16 MiB), so a run cut off
#    early still brings back every stage that finished, with BUILD.json (settings, measurements, the
#    run's log) inside the archives;
# 3. writes the whole console output to $OUT/build.log (the 8th file) and ends with a table of what each
#    stage did (seconds, samples/s, where and why it stopped) -- the rates to put in rebuild.py's table.
#
# Back here: `idcraft world unpack --from <files_at> --output ./bundle-h200` restores the bundle.
set -uo pipefail

OUT="${OUT:-$PWD/out}"
BUDGET="${BUDGET:-550}"
BUNDLE="${BUNDLE:-/tmp/world-bundle}"
PROFILE="${PROFILE:-h200}"
DEVICE="${DEVICE:-cuda}"  # cpu (with PROFILE=tiny) tries this script on a machine without a GPU
mkdir -p "$OUT"
LOG="$OUT/build.log"
: >"$LOG"
started=$(date +%s)

say() { echo "[gpu_world_build] $*" | tee -a "$LOG"; }

wheels=(.whl/diffusers-*.whl)
if [ ! -e "${wheels[0]}" ]; then
    say "no diffusers wheel in .whl/ (carry it: see docs/world-gpu.md)"
    exit 3
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" >>"$LOG" 2>&1 || { say "pip could not install ${wheels[*]}"; exit 3; }
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1

DEVICE="$DEVICE" python3 - >>"$LOG" 2>&1 <<'PY' || { say "the environment check failed:"; tail -20 "$LOG"; exit 4; }
import os
import platform

import accelerate, diffusers, torch, transformers

import idcraft
from idcraft.world.rebuild import PROFILES

cuda = os.environ["DEVICE"].startswith("cuda")
assert not cuda or torch.cuda.is_available(), "no CUDA device"
print(
    f"[gpu_world_build] python {platform.python_version()}, torch {torch.__version__}, diffusers "
    f"{diffusers.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
    f"idcraft from {idcraft.__file__}, "
    + (f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
       if cuda else f"{os.cpu_count()} CPUs")
)
PY
say "set-up took $(( $(date +%s) - started )) s; building with --profile $PROFILE for at most $BUDGET s"

timeout --signal=INT --kill-after=20 "$BUDGET" \
    python3 -m idcraft world build --profile "$PROFILE" --device "$DEVICE" --output "$BUNDLE" --pack "$OUT" \
    --keep-going "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ] || [ "$rc" = 130 ] || [ "$rc" = 137 ]; then
    say "the build was cut off after $BUDGET s (exit $rc); the archives hold every stage that finished"
fi

python3 - "$BUNDLE/BUILD.json" 2>&1 <<'PY' | tee -a "$LOG"
import json
import sys

try:
    record = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("[gpu_world_build] no BUILD.json: no stage finished")
print(f"{'stage':16} {'seconds':>8} {'samples/s':>10} {'steps':>7} stopped  key measurements")
for name, stage in record.get("stages", {}).items():
    m = stage.get("measurements", {})
    keys = {k: m[k] for k in ("final_loss", "psnr_face", "eval_loss_caption", "analyser_top1") if k in m}
    ceiling = m.get("ceiling") or {}
    if ceiling:
        keys["ceiling_fine"] = ceiling["vae"]["fine"]
    print(
        f"{name:16} {stage.get('seconds', 0):8.1f} {m.get('samples_per_second', '-')!s:>10} "
        f"{m.get('steps_done', m.get('steps', '-'))!s:>7} {m.get('stopped_by', '-'):8} "
        + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in keys.items())
    )
for name, failure in record.get("failures", {}).items():
    print(f"{name:16} FAILED: {failure['error']}")
PY
say "done in $(( $(date +%s) - started )) s (build exit $rc); files in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
exit "$rc"
