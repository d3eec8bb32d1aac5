"""Tiny random models of each Llama family, built with transformers and saved as a Hub download would be."""
from pathlib import Path

import torch

FAMILIES = {
    "llama2": dict(cls="LlamaConfig", num_key_value_heads=4),
    "llama3.1": dict(cls="LlamaConfig", num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=256,
                     rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=32)),
    "llama3.2": dict(cls="LlamaConfig", num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
                     rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=32)),
    "mistral": dict(cls="MistralConfig", num_key_value_heads=2, sliding_window=24),
}


def save_hf_model(family: str, folder: Path, vocab_size=128, seed=0):
    """Random fp32 model of the family, saved with save_pretrained in several safetensors shards."""
    import transformers
    spec = dict(FAMILIES[family])
    cls = getattr(transformers, spec.pop("cls"))
    spec.setdefault("max_position_embeddings", 256)
    config = cls(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                 vocab_size=vocab_size, rms_norm_eps=1e-5, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # random norms too, so a norm bug cannot hide behind weights of one
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, max_shard_size="100KB")
    return model
