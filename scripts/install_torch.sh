#!/usr/bin/env bash
# Install torch into the given Python's environment only if it has none.
# A torch that is already importable there (e.g. a GPU user's own CUDA build) is kept as it is, if it is
# recent enough for poetlm (pyproject.toml: torch>=2.6); pip would otherwise replace an older one with
# the newest torch it finds, which is no one's choice.
# Without one we ask for the 2.13.0 build by exact version; set TORCH_SPEC to choose another
# (e.g. TORCH_SPEC="torch==2.13.0+cpu" together with PIP_EXTRA_INDEX_URL pointing at PyTorch's CPU wheels,
# so that a machine without a GPU never downloads the multi-GB CUDA build).
set -euo pipefail
py="$1"
if version=$("$py" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  # major.minor from the front of the version (2.6.0a0+git…, 2.13.0+cpu); one that does not start so is kept
  if "$py" -c "import re, sys, torch; v = re.match(r'(\d+)\.(\d+)', torch.__version__); sys.exit(bool(v) and (int(v[1]), int(v[2])) < (2, 6))"; then
    exit 0
  fi
  echo "torch $version in $("$py" -c 'import sys; print(sys.prefix)') is older than 2.6, which poetlm needs;" \
       "upgrade it there (e.g. pip install torch==2.13.0), or remove that environment to start a new one" >&2
  exit 1
fi
"$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
