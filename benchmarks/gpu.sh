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
cuda_torch() { "$1" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; }
# This checkout's poetlm, not one installed from elsewhere.
has_poetlm() { REPO="$PWD" "$1" -c "import os, poetlm; assert poetlm.__file__.startswith(os.environ['REPO'] + os.sep)" 2>/dev/null; }
can_bench() { "$1" -c "import poetlm.train.loop, poetlm.train.models" 2>/dev/null; }  # + transformers, matplotlib, ...
if ! { cuda_torch "$PY" && can_bench "$PY"; }; then
  if [ -x .venv/bin/python ] && cuda_torch .venv/bin/python && can_bench .venv/bin/python; then
    PY=.venv/bin/python
  else
    cuda_torch "$PY" || { echo "$PY has no CUDA-enabled torch (set PYTHON=...)" >&2; exit 1; }
    # Outside the repo so the working tree stays clean; --system-site-packages keeps the machine's
    # CUDA build of torch, and --no-deps keeps pip from replacing it with some other wheel.
    VENV=${TMPDIR:-/tmp}/poetlm-gpu-venv
    if [ ! -x "$VENV/bin/python" ]; then
      "$PY" -m venv --system-site-packages "$VENV"
      # A venv's "system" packages are its base interpreter's: when $PY is itself a venv (or torch sits
      # on its PYTHONPATH), point the new one at the directory that holds this torch.
      if ! cuda_torch "$VENV/bin/python"; then
        torch_dir=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
        "$VENV/bin/python" -c "import sysconfig, sys; open(sysconfig.get_paths()['purelib'] + '/_machine_torch.pth', 'w').write(sys.argv[1] + '\n')" "$torch_dir"
      fi
    fi
    PY=$VENV/bin/python
    cuda_torch "$PY" || { echo "the venv $VENV cannot import the machine's CUDA torch" >&2; exit 1; }
    if ! has_poetlm "$PY"; then
      echo "installing poetlm (editable) into $VENV" >&2
      # Offline first (the machine's setuptools), then with pip's isolated build (needs the index).
      "$PY" -m pip install -q --no-deps --no-build-isolation -e . >&2 2>/dev/null \
        || "$PY" -m pip install -q --timeout 15 --retries 1 --no-deps -e . >&2 \
        || { echo "pip install -e . failed; running from src/ instead" >&2; export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; }
    fi
    # The rest of poetlm's dependencies (never torch); offline machines must already have them.
    can_bench "$PY" || "$PY" -m pip install -q --timeout 15 --retries 1 numpy safetensors transformers tokenizers tqdm matplotlib >&2 \
      || echo "could not install poetlm's dependencies (offline?)" >&2
  fi
fi
has_poetlm "$PY" || { echo "poetlm is not importable by $PY" >&2; exit 1; }
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
if can_bench "$PY"; then
  # Whatever is left of the 8 minutes, less a margin for the interpreter to exit.
  left=$(( 450 - ($(date +%s) - start) ))
  (( left > 120 )) || left=120  # a slow install must not leave timeout 0 (= no limit) or nothing
  timeout "$left" "$PY" benchmarks/step.py --device cuda --dtype bf16 \
    --presets ${GPU_PRESETS:-llama-60m llama-350m} --methods ${GPU_METHODS:-adamw poet-b64 poet-b256} \
    --accum 1 4 --repeats "${GPU_REPEATS:-10}" --warmup 2 --profile || bench_status=$?
else
  echo "skipped: poetlm.train does not import (transformers, numpy, safetensors or matplotlib missing)"
  bench_status=1
fi

echo
echo "total $(( $(date +%s) - start )) s; correctness exit $check_status, benchmark exit $bench_status"
[ "$check_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
