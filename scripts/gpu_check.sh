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
# bf16, then int8 and int4 (quantize.py's formats, quantized in memory) and any-precision at each width 3..8 (one
# copy quantized by anyprec.py, one compiled graph per width) in one run against the same copy bandwidth
step python scripts/bench.py decode --model_name Llama-2-7b-chat-hf --compile --mode int8 int4 anyprec
# quantize.py's and anyprec.py's kernels (the op picks GEMV, tensor cores or dequantize + matmul by token count)
# against bf16 torch.matmul and torch's int4 matmul, on Llama-2-7B's and Llama-3-8B's layer shapes, in one run
step python scripts/bench.py kernels --tokens 1 8 16 32 64 --model_names Llama-2-7b-chat-hf Meta-Llama-3-8B
# Speculative decoding, plain vs speculative in one run: the tiny pair, then drafts of random Llama-2-7B weights
step python scripts/bench.py speculative --checkpoint_path checkpoints/tiny-py/model.pth \
    --draft_checkpoint_path checkpoints/tiny-py-draft/model.pth --speculate_k 4 --compile
step python scripts/bench.py speculative --model_name Llama-2-7b-chat-hf --compile
# Medusa, plain vs Medusa in one run: the tiny model with its shipped heads (greedy, then sampling), then the
# per-step overhead of mc_sim_7b_63's 64-node tree on random Llama-2-7B weights, and an int4 copy's Medusa step
# over the bf16 model's (README's "int4 Medusa step / bf16")
step python scripts/bench.py medusa --checkpoint_path checkpoints/tiny-py/model.pth --compile
step python scripts/bench.py medusa --checkpoint_path checkpoints/tiny-py/model.pth --compile --temperature 0.8
step python scripts/bench.py medusa --model_name Llama-2-7b-chat-hf --compile --mode int4
# Tensor parallelism: tok/s at 1, 2, 4, 8 ranks, as many as there are GPUs (on a one-GPU machine, the 1-rank row)
step python scripts/bench.py tp --model_name Llama-2-7b-chat-hf --compile
exit $status
