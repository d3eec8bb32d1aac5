#!/usr/bin/env bash
# The GPU benchmarks that do not fit scripts/gpu_check.sh's 8 minutes: every any-precision width, speculative and
# Medusa decoding, tensor parallelism. About 15 minutes on an H200; each command is one README table.
#   scripts/gpu_bench.sh 2>&1 | tee gpu_bench.txt
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
status=0
step() { echo; echo "=== $*"; "$@" || status=1; }

# Any-precision at every width, one compiled graph (and CUDA graph) each, beside bf16, int8 and int4
step python scripts/bench.py decode --model_name Llama-2-7b-chat-hf --compile --mode int8 int4 anyprec
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
