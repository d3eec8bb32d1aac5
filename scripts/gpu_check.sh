#!/usr/bin/env bash
# Everything that needs a GPU, in one command: every cuda-marked test, then every benchmark, as one report.
# A GPU is lent only now and then, for minutes: this runs in well under 10 minutes on an H100.
#   scripts/gpu_check.sh 2>&1 | tee gpu_report.txt
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"  # load_inline builds one architecture: minutes saved
status=0
step() { echo; echo "=== $*"; "$@" || status=1; }

python - <<'PY'
import datetime, torch
print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"{datetime.date.today().isoformat()}")
PY
step python -m pytest -q -m cuda -rs
step python scripts/bench.py --model_name Llama-2-7b-chat-hf --compile
exit $status
