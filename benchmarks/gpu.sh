#!/usr/bin/env bash
# POET on one CUDA GPU, in under 8 minutes, tables to stdout:
#   1. correctness (benchmarks/gpu_check.py): POETLinear forward/backward (fp32, bf16 autocast, bf16
#      build) and merges, and steps of the POET optimizer, on CUDA against a CPU fp64 reference;
#   2. step benchmark (benchmarks/step.py): AdamW, POET (fold form, fp32 and bf16 directions) and
#      POET-paper (fp32 and bf16 builds), bf16 autocast, llama-60m and llama-350m: step time, tokens/s,
#      peak memory;
#   3. the same compiled (torch.compile per decoder block) and not, and with activation checkpointing;
#   and the fold form's optimizer step alone (benchmarks/optimizer.py) against AdamW's.
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

echo "## CUDA correctness (benchmarks/gpu_check.py: layer form and POET optimizer, CUDA vs fp64 on CPU)"
echo
check_status=0
timeout 120 "$PY" benchmarks/gpu_check.py --device cuda || check_status=$?
echo

# Each step.py run gets its own cap, cut to what is left of the 8 minutes (less a margin for the
# interpreter to exit), and at least 30 s: a slow start must not turn into `timeout 0` (no limit).
budget() { local left=$(( 470 - ($(date +%s) - start) )); (( left < $1 )) || left=$1; (( left > 30 )) || left=30; echo "$left"; }
bench_status=0
step() {
  local cap=$1; shift
  timeout "$(budget "$cap")" "$PY" benchmarks/step.py --device cuda --dtype bf16 "$@" || bench_status=$?
  echo
}
if can_bench "$PY"; then
  echo "## The fold form's optimizer alone (benchmarks/optimizer.py): POET b=64 / 256 against AdamW, fp32"
  echo
  timeout 90 "$PY" benchmarks/optimizer.py --device cuda --preset llama-60m --threads 8 --repeats 5 --direction-dtypes fp32 bf16 \
    --compile inductor || bench_status=$?
  echo
  echo "The same, batched as on a CPU (one weight per batch at b=256): what the GPU's batching saves"
  echo
  timeout 40 "$PY" benchmarks/optimizer.py --device cuda --preset llama-60m --threads 8 --repeats 5 --orthogonalize newton_schulz \
    --chunks cpu || bench_status=$?
  echo
  echo "## Step benchmark (bf16 autocast): fold form, layer form with fp32 and bf16 builds, AdamW"
  echo
  # The first H200 run gave one 200 s cap to both presets with every contender profiled: llama-60m
  # used all of it. Profiles at llama-60m, the main contenders at llama-350m. (The bf16 direction and
  # bf16 build, poet-b256-bf16 and paper-b256-bf16, were no faster there: add them with GPU_METHODS.)
  step 150 --presets ${GPU_PRESETS:-llama-60m} \
    --methods ${GPU_METHODS:-adamw poet-b256 paper-b64 paper-b256} \
    --accum 1 4 --repeats "${GPU_REPEATS:-6}" --warmup 2 --profile
  step 90 --presets llama-350m --methods adamw poet-b256 paper-b256 --accum 1 4 --repeats 5 --warmup 1
  echo "## torch.compile (each decoder block, inductor) vs eager, side by side"
  echo
  # The warmup round compiles: one block graph per contender (AdamW and POET have the same one).
  step 130 --presets llama-350m --methods adamw poet-b256 paper-b256 --accum 4 --repeats 5 --warmup 1 --merges 0 --compile both
  echo "## Activation checkpointing: peak memory and step time with and without"
  echo
  step 80 --presets llama-350m --methods adamw poet-b256 paper-b256 --accum 1 --repeats 3 --warmup 1 --merges 0 \
    --activation-checkpointing both
else
  echo "skipped: poetlm.train does not import (transformers, numpy, safetensors or matplotlib missing)"
  bench_status=1
fi

echo "total $(( $(date +%s) - start )) s; correctness exit $check_status, benchmark exit $bench_status"
[ "$check_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
