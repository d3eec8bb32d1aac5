#!/usr/bin/env bash
# The quick GPU check, for the minutes a GPU is lent: every cuda-marked test (the kernels natively, against the same
# references the CPU emulator checks), one compiled decode benchmark per format on random Llama-2-7B weights, and the
# kernels against bf16 torch.matmul. Each step has a time cap, so that the whole fits one 8-minute call on a cold
# H200 (builds included); a step that runs out says so and the next one starts. scripts/gpu_bench.sh is the rest.
#   scripts/gpu_check.sh 2>&1 | tee gpu_report.txt
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"  # load_inline builds one architecture: minutes saved
status=0
step() {  # step SECONDS COMMAND...
  local seconds=$1; shift
  echo; echo "=== $* (at most ${seconds} s)"
  timeout --kill-after=10 "$seconds" "$@"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "=== ran out of its ${seconds} s"; fi
  [ $rc -eq 0 ] || status=1
}

python - <<'PY'
import datetime, torch
print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"{datetime.date.today().isoformat()}")
PY
# Builds both files' kernels (about a minute each with nvcc for one architecture), then runs them.
step 210 python -m pytest -q -m cuda -rs
# bf16, then int8, int4 g128 (quantized in memory) and any-precision at 4 bits, compiled, against the copy bandwidth
step 150 python scripts/bench.py decode --model_name Llama-2-7b-chat-hf --compile --mode int8 int4 anyprec \
    --precision 4 --max_new_tokens 100 --runs 2
# The ops (GEMV, tensor cores or dequantize + matmul by token count) against bf16 torch.matmul and torch's int4 matmul
step 60 python scripts/bench.py kernels --tokens 1 8 16 32 64 --model_names Llama-2-7b-chat-hf Meta-Llama-3-8B
exit $status
