#!/usr/bin/env bash
# Download a Hugging Face Llama-family model and convert it: scripts/prepare.sh meta-llama/Llama-2-7b-chat-hf
# Then: python generate.py --checkpoint_path checkpoints/<repo_id>/model.pth
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: scripts/prepare.sh <hf_repo_id>   (e.g. meta-llama/Llama-2-7b-chat-hf; gated models need HF_TOKEN)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
# The interpreter of the environment this runs in (an activated venv's, or $PYTHON), never a bare `python`.
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
"$PYTHON" scripts/download.py --repo_id "$1"
"$PYTHON" scripts/convert_hf_checkpoint.py --checkpoint_dir "checkpoints/$1"
