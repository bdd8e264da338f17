#!/usr/bin/env bash
# Install torch into the given Python's environment only if it has none.
# A torch that is already importable (e.g. a GPU user's own CUDA build) is kept as it is.
# Without one we ask for the 2.13.0 build by exact version; set TORCH_SPEC to choose another
# (e.g. TORCH_SPEC="torch==2.13.0+cpu" together with PIP_EXTRA_INDEX_URL pointing at PyTorch's CPU wheels,
# so that a machine without a GPU never downloads the multi-GB CUDA build).
set -euo pipefail
py="$1"
if "$py" -c "import torch" 2>/dev/null; then
  exit 0
fi
"$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
