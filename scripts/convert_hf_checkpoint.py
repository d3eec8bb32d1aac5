"""Convert a Hugging Face Llama-family checkpoint folder into ours: DIR/model.pth and DIR/config.json.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-chat-hf

Reads safetensors or .bin weights, sharded or not. The Hugging Face config.json is kept as hf_config.json, the
tokenizer files stay where they are. q/k rows are permuted so that RoPE rotates interleaved pairs, and q, k, v are
fused into one wqkv (model.py's layout).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402
from model import ModelArgs, atomic_write  # noqa: E402

HF_TO_OURS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}


def model_args_from_hf(hf: dict) -> ModelArgs:
    if hf.get("model_type") not in ("llama", "mistral"):
        raise ValueError(f"model_type {hf.get('model_type')!r} is not a Llama-family model (llama or mistral)")
    # transformers 4 writes rope_theta and rope_scaling; transformers 5 folds both into rope_parameters.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    base = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope type {rope_type!r} is not supported (only default and llama3)")
    scaling = None
    if rope_type == "llama3":
        scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")}
    return ModelArgs(
        block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        dim=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rope_base=float(base), rope_scaling=scaling, norm_eps=hf["rms_norm_eps"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=hf.get("sliding_window") if hf.get("model_type") == "mistral" else None)


def load_hf_weights(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {folder}: download with scripts/download.py")
    weights = {}
    for f in files:
        if f.suffix == ".safetensors":
            weights.update(safetensors.torch.load_file(f))
        else:
            weights.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return weights


def interleave_rope_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Hugging Face rotates (x[i], x[i + D/2]); Meta and we rotate (x[2i], x[2i+1]): reorder each head's rows."""
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def convert(hf_weights: dict, config: ModelArgs) -> dict:
    state = {}
    for hf_name, tensor in hf_weights.items():
        if "rotary_emb.inv_freq" in hf_name or not hf_name.endswith("weight"):
            continue
        parts = hf_name.split(".")
        layer = parts[2] if hf_name.startswith("model.layers.") else None
        key = hf_name if layer is None else hf_name.replace(f".{layer}.", ".{}.", 1)
        if key in HF_TO_OURS:
            state[HF_TO_OURS[key].format(layer)] = tensor
    for i in range(config.n_layer):
        p = f"model.layers.{i}.self_attn."
        q = interleave_rope_rows(hf_weights[p + "q_proj.weight"], config.n_head, config.head_dim)
        k = interleave_rope_rows(hf_weights[p + "k_proj.weight"], config.n_kv_heads, config.head_dim)
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, hf_weights[p + "v_proj.weight"]])
    if config.tie_embeddings:
        state.pop("output.weight", None)  # the embedding is the output head
    return state


def to_hf(state: dict, config: ModelArgs) -> dict:
    """The inverse of convert: our state dict as Hugging Face Llama weights (scripts/bench.py's transformers rows)."""
    hf = {}
    for hf_key, key in HF_TO_OURS.items():
        for i in range(config.n_layer) if "{}" in key else [None]:
            if key.format(i) in state:
                hf[hf_key.format(i)] = state[key.format(i)]
    q_rows, kv_rows = config.n_head * config.head_dim, config.n_kv_heads * config.head_dim
    for i in range(config.n_layer):
        q, k, v = state[f"layers.{i}.attention.wqkv.weight"].split([q_rows, kv_rows, kv_rows])
        p = f"model.layers.{i}.self_attn."
        hf[p + "q_proj.weight"] = unleave_rope_rows(q, config.n_head, config.head_dim)
        hf[p + "k_proj.weight"] = unleave_rope_rows(k, config.n_kv_heads, config.head_dim)
        hf[p + "v_proj.weight"] = v
    return hf


def unleave_rope_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """interleave_rope_rows undone."""
    return w.view(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    folder = args.checkpoint_dir
    hf_config_path = folder / "hf_config.json"
    if not hf_config_path.is_file():
        hf_config_path = folder / "config.json"
    if not hf_config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: download the model first (scripts/download.py)")
    hf_config = json.loads(hf_config_path.read_text())
    if "model_type" not in hf_config:
        raise ValueError(f"{hf_config_path} is not a Hugging Face config (already converted?)")
    config = model_args_from_hf(hf_config)
    state = convert(load_hf_weights(folder), config)
    # Each file complete under its final name or not there: an interrupted run leaves nothing half-written.
    with atomic_write(folder / "model.pth") as f:
        torch.save(state, f)
    if hf_config_path.name == "config.json":
        os.replace(hf_config_path, folder / "hf_config.json")
    config.save(folder / "config.json")
    print(f"wrote {folder / 'model.pth'} and {folder / 'config.json'}")


if __name__ == "__main__":
    cli.run(main)
