#!/usr/bin/env bash
# POET on one CUDA GPU, in under 8 minutes, tables to stdout:
#   1. correctness: POETLinear forward/backward on CUDA against a CPU fp64 reference, and merges
#      leaving the output unchanged;
#   2. step benchmark (benchmarks/step.py): POET vs AdamW, bf16 autocast, llama-60m and llama-350m,
#      step time, tokens/s and peak torch.cuda.max_memory_allocated.
# Run from the repository root:  bash benchmarks/gpu.sh
# Environment: PYTHON (interpreter with a CUDA torch, default python3), GPU_METHODS, GPU_PRESETS,
# GPU_REPEATS to change what step.py runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)

PY=${PYTHON:-python3}
importable() { "$1" -c "import torch, poetlm, transformers; assert torch.cuda.is_available()" 2>/dev/null; }
if ! importable "$PY"; then
  if [ -x .venv/bin/python ] && importable .venv/bin/python; then
    PY=.venv/bin/python
  else
    # Outside the repo so the working tree stays clean; --system-site-packages keeps the machine's
    # CUDA build of torch (pip would otherwise resolve torch to whatever wheel it finds).
    VENV=${TMPDIR:-/tmp}/poetlm-gpu-venv
    [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
    PY=$VENV/bin/python
    echo "installing poetlm into $VENV" >&2
    if ! "$PY" -m pip install -q --no-build-isolation -e . >&2; then
      # Offline and some dependency missing from the system packages: run from the source tree.
      echo "pip install -e . failed; using PYTHONPATH=src" >&2
      export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
    importable "$PY" || { echo "poetlm (with torch+CUDA and transformers) is still not importable by $PY" >&2; exit 1; }
  fi
fi
echo "python: $PY"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo

echo "## CUDA correctness (POETLinear 512→1280, fp32 on CUDA vs fp64 on CPU)"
echo
check_status=0
timeout 120 "$PY" - <<'EOF' || check_status=$?
import sys

import torch

sys.path.insert(0, "benchmarks")
from common import markdown_table
from poetlm import POETConfig, POETLinear

torch.manual_seed(0)
device = torch.device("cuda")
# Failures are bugs, not round-off: a wrong permutation or block is an O(1) error.
TOL = {"fwd fp32": 1e-5, "fwd bf16": 3e-2, "grad fp32": 1e-4, "merge fp32": 1e-5, "merge fp64": 1e-12}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


rows, failed = [], False
configs = {"bs b=64": dict(variant="bs", block_size=64), "bs b=256": dict(variant="bs", block_size=256),
           "fs β=½": dict(variant="fs", fraction=0.5)}
for name, kwargs in configs.items():
    for mode in ("weight", "input"):
        config = POETConfig(forward_mode=mode, **kwargs)
        ref = POETLinear(512, 1280, config=config, name="check", dtype=torch.float64)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for side in (ref.rotation_in, ref.rotation_out):  # ‖Q‖ of a trained block, not the identity
                side.skew.copy_(torch.randn(side.skew.shape, generator=gen, dtype=torch.float64) * 0.02)
            ref.bias.copy_(torch.randn(1280, generator=gen, dtype=torch.float64))
        gpu = POETLinear(512, 1280, config=config, name="check", device=device)
        gpu.load_state_dict(ref.state_dict())  # copy_ casts to fp32 and moves to CUDA
        x = torch.randn(4, 256, 512, generator=gen, dtype=torch.float64)
        g = torch.randn(4, 256, 1280, generator=gen, dtype=torch.float64)
        y_ref = ref(x)
        y_ref.backward(g)
        xg = x.float().to(device)
        y = gpu(xg)
        y.backward(g.float().to(device))
        grad = rel(torch.cat([p.grad for p in gpu.rotation_parameters()]), torch.cat([p.grad for p in ref.rotation_parameters()]))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            y_bf16 = gpu(xg)
        with torch.no_grad():
            before = gpu(xg)
            gpu.merge()
            merged = rel(gpu(xg), before)
            before = ref(x)
            ref.merge()
            merged64 = rel(ref(x), before)
        errors = {"fwd fp32": rel(y, y_ref), "fwd bf16": rel(y_bf16, y_ref), "grad fp32": grad,
                  "merge fp32": merged, "merge fp64": merged64}
        ok = all(errors[k] <= TOL[k] for k in TOL)
        failed |= not ok
        rows.append([name, mode] + [f"{errors[k]:.1e}" for k in TOL] + ["ok" if ok else "FAIL"])
print(markdown_table(["config", "path"] + [f"{k} (≤{v:g})" for k, v in TOL.items()] + ["result"], rows, align="ll" + "r" * 6))
print("\nrelative errors ‖a−b‖/‖b‖; merge: output after merge() vs before, same layer")
sys.exit(1 if failed else 0)
EOF
echo

echo "## Step benchmark (bf16 autocast, CUDA)"
echo
bench_status=0
# Whatever is left of the 8 minutes, less a margin for the interpreter to exit.
left=$(( 450 - ($(date +%s) - start) ))
timeout "$left" "$PY" benchmarks/step.py --device cuda --dtype bf16 \
  --presets ${GPU_PRESETS:-llama-60m llama-350m} --methods ${GPU_METHODS:-adamw poet-b64 poet-b256} \
  --accum 1 4 --repeats "${GPU_REPEATS:-10}" --warmup 2 --profile || bench_status=$?

echo
echo "total $(( $(date +%s) - start )) s; correctness exit $check_status, benchmark exit $bench_status"
[ "$check_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
