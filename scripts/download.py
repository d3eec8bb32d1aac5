"""Download a Hugging Face model's weights, config and tokenizer files (nothing else) into checkpoints/REPO_ID.

    python scripts/download.py --repo_id meta-llama/Llama-2-7b-chat-hf
    HF_TOKEN=... python scripts/download.py --repo_id meta-llama/Llama-3.1-8B-Instruct

Gated models need a token: the HF_TOKEN environment variable (or a prior `hf auth login`); --hf_token works too but
shows the token to anyone who lists this machine's processes. The token is passed to the Hub and never printed or
saved.
"""
import argparse
import os
import sys
from pathlib import Path

from huggingface_hub import list_repo_files, snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402

# Weights (safetensors preferred; .bin only where a repo has no safetensors), config, and tokenizer files.
# "original/tokenizer.model" is Llama 3's tiktoken file; Meta's own consolidated weights are not fetched.
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
OTHER_PATTERNS = ["config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "original/tokenizer.model"]


def download(repo_id: str, out_dir: Path, token=None) -> Path:
    folder = out_dir / repo_id
    try:
        files = list_repo_files(repo_id, token=token)
        weights = WEIGHT_PATTERNS if any(f.endswith(".safetensors") for f in files) else BIN_PATTERNS
        snapshot_download(repo_id, local_dir=folder, allow_patterns=weights + OTHER_PATTERNS, token=token)
    except GatedRepoError:
        raise ValueError(f"{repo_id} is gated: accept its license on huggingface.co, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ValueError(f"no repository {repo_id} on the Hub (or it is private: set HF_TOKEN)") from None
    except Exception as e:
        # No network: the Hub client raises its HTTP library's own errors (or ConnectionError when offline).
        if not isinstance(e, ConnectionError) and "httpx" not in type(e).__module__ and "requests" not in type(e).__module__:
            raise
        raise ValueError(f"cannot reach the Hugging Face Hub ({type(e).__name__}): check the network, or copy the "
                         f"model's files into {folder} and run scripts/convert_hf_checkpoint.py") from None
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo_id", required=True, help="e.g. meta-llama/Llama-2-7b-chat-hf")
    p.add_argument("--out_dir", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--hf_token", default=None, help="prefer the HF_TOKEN environment variable: a flag's value is "
                   "visible to every user of this machine in the process list")
    args = p.parse_args(argv)
    folder = download(args.repo_id, args.out_dir, args.hf_token or os.environ.get("HF_TOKEN"))
    print(f"downloaded {args.repo_id} to {folder}")


if __name__ == "__main__":
    cli.run(main)
