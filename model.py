"""Llama-family transformer: GQA, RoPE (with Llama 3.1 scaling), RMSNorm, SwiGLU and a static KV cache.

Weights use gpt-fast's layout: q, k and v fused into one `wqkv`, and q/k rows permuted at conversion so that RoPE
rotates interleaved pairs (Meta's convention). Positions are tensors everywhere the decode loop runs, so one
compiled graph serves every step.
"""
import difflib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    block_size: int = 2048  # longest context the model was trained for
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_kv_heads: int = -1  # -1: same as n_head (no GQA)
    dim: int = 4096
    intermediate_size: int = 11008
    head_dim: int = -1  # -1: dim // n_head
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama 3.1: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sliding_window: Optional[int] = None  # Mistral v0.1: a query sees only the last `sliding_window` keys

    def __post_init__(self):
        if self.n_kv_heads == -1:
            self.n_kv_heads = self.n_head
        if self.head_dim == -1:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        key = name.lower()
        for known, shape in transformer_configs.items():
            if known.lower() == key:
                return cls(**shape)
        close = difflib.get_close_matches(name, transformer_configs, n=5, cutoff=0.4)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown model '{name}'.{hint} Known: see transformer_configs in model.py.")

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        config = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; re-run scripts/convert_hf_checkpoint.py")
        return cls(**config)

    @classmethod
    def for_checkpoint(cls, checkpoint_path) -> "ModelArgs":
        """config.json beside the weights; else the registry entry named like the checkpoint's folder."""
        folder = Path(checkpoint_path).parent
        if (folder / "config.json").is_file():
            return cls.from_json(folder / "config.json")
        try:
            return cls.from_name(folder.name)
        except ValueError as e:
            raise ValueError(f"no config.json in {folder} and {e}") from None

    def save(self, path):
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


_LLAMA31_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, factor=32.0)
_LLAMA3 = dict(vocab_size=128256, rope_base=500000.0)
_LLAMA2_7B = dict(block_size=4096, n_layer=32, n_head=32, dim=4096, intermediate_size=11008)
_LLAMA2_13B = dict(block_size=4096, n_layer=40, n_head=40, dim=5120, intermediate_size=13824)
_LLAMA_70B = dict(n_layer=80, n_head=64, n_kv_heads=8, dim=8192, intermediate_size=28672)
_LLAMA3_8B = dict(_LLAMA3, n_layer=32, n_head=32, n_kv_heads=8, dim=4096, intermediate_size=14336)
_CODE = dict(block_size=16384, rope_base=1000000.0)
_MISTRAL = dict(n_layer=32, n_head=32, n_kv_heads=8, dim=4096, intermediate_size=14336)

# Real shapes, named as their Hugging Face repos are. The fallback when a checkpoint folder has no config.json.
transformer_configs = {
    "Llama-2-7b-hf": _LLAMA2_7B,
    "Llama-2-7b-chat-hf": _LLAMA2_7B,
    "Llama-2-13b-hf": _LLAMA2_13B,
    "Llama-2-13b-chat-hf": _LLAMA2_13B,
    "Llama-2-70b-hf": dict(_LLAMA_70B, block_size=4096),
    "Llama-2-70b-chat-hf": dict(_LLAMA_70B, block_size=4096),
    "CodeLlama-7b-hf": dict(_LLAMA2_7B, **_CODE, vocab_size=32016),
    "CodeLlama-7b-Instruct-hf": dict(_LLAMA2_7B, **_CODE, vocab_size=32016),
    "CodeLlama-13b-hf": dict(_LLAMA2_13B, **_CODE, vocab_size=32016),
    "CodeLlama-13b-Instruct-hf": dict(_LLAMA2_13B, **_CODE, vocab_size=32016),
    "CodeLlama-34b-hf": dict(_CODE, n_layer=48, n_head=64, n_kv_heads=8, dim=8192, intermediate_size=22016),
    "CodeLlama-34b-Instruct-hf": dict(_CODE, n_layer=48, n_head=64, n_kv_heads=8, dim=8192, intermediate_size=22016),
    "Meta-Llama-3-8B": dict(_LLAMA3_8B, block_size=8192),
    "Meta-Llama-3-8B-Instruct": dict(_LLAMA3_8B, block_size=8192),
    "Meta-Llama-3-70B": dict(_LLAMA3, **_LLAMA_70B, block_size=8192),
    "Meta-Llama-3-70B-Instruct": dict(_LLAMA3, **_LLAMA_70B, block_size=8192),
    "Llama-3.1-8B": dict(_LLAMA3_8B, block_size=131072, rope_scaling=_LLAMA31_ROPE),
    "Llama-3.1-8B-Instruct": dict(_LLAMA3_8B, block_size=131072, rope_scaling=_LLAMA31_ROPE),
    "Llama-3.1-70B": dict(_LLAMA3, **_LLAMA_70B, block_size=131072, rope_scaling=_LLAMA31_ROPE),
    "Llama-3.1-70B-Instruct": dict(_LLAMA3, **_LLAMA_70B, block_size=131072, rope_scaling=_LLAMA31_ROPE),
    "Llama-3.1-405B": dict(_LLAMA3, block_size=131072, rope_scaling=_LLAMA31_ROPE, n_layer=126, n_head=128,
                           n_kv_heads=8, dim=16384, intermediate_size=53248),
    "Llama-3.2-1B": dict(_LLAMA3, block_size=131072, rope_scaling=_LLAMA32_ROPE, n_layer=16, n_head=32, n_kv_heads=8,
                         dim=2048, intermediate_size=8192, tie_embeddings=True),
    "Llama-3.2-3B": dict(_LLAMA3, block_size=131072, rope_scaling=_LLAMA32_ROPE, n_layer=28, n_head=24, n_kv_heads=8,
                         dim=3072, intermediate_size=8192, tie_embeddings=True),
    "Mistral-7B-v0.1": dict(_MISTRAL, block_size=32768, sliding_window=4096),
    "Mistral-7B-Instruct-v0.1": dict(_MISTRAL, block_size=32768, sliding_window=4096),
    "Mistral-7B-v0.3": dict(_MISTRAL, block_size=32768, vocab_size=32768, rope_base=1000000.0),
    "Mistral-7B-Instruct-v0.3": dict(_MISTRAL, block_size=32768, vocab_size=32768, rope_base=1000000.0),
    "TinyLlama-1.1B": dict(n_layer=22, n_head=32, n_kv_heads=4, dim=2048, intermediate_size=5632),
    "TinyLlama-1.1B-Chat-v1.0": dict(n_layer=22, n_head=32, n_kv_heads=4, dim=2048, intermediate_size=5632),
}


class KVCache(nn.Module):
    def __init__(self, max_batch_size, max_seq_length, n_kv_heads, head_dim, dtype):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, cache_pos: Tensor, k: Tensor, v: Tensor):
        # cache_pos [B, S]; k, v [B, H_kv, S, D]. Every row writes its own slots, so rows may sit at different lengths.
        B = k.shape[0]
        rows = torch.arange(B, device=k.device)[:, None]
        k_cache, v_cache = self.k_cache[:B], self.v_cache[:B]
        k_cache[rows, :, cache_pos] = k.transpose(1, 2)  # indexed view is [B, S, H_kv, D]
        v_cache[rows, :, cache_pos] = v.transpose(1, 2)
        return k_cache, v_cache


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1

    @property
    def has_cache(self) -> bool:
        """Whether setup_caches has run: decode with positions and a KV cache, rather than whole sequences."""
        return self.max_seq_length > 0

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the KV cache and the RoPE table once; decode then runs on static shapes."""
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds the model's block_size {self.config.block_size}")
        if (max_batch_size, max_seq_length) == (self.max_batch_size, self.max_seq_length):
            return
        c = self.config
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        for layer in self.layers:
            attention = layer.attention
            attention.kv_cache = KVCache(max_batch_size, max_seq_length, attention.n_kv_heads, c.head_dim, dtype).to(device)
        self.register_buffer("rope", rope_table(max_seq_length, c.head_dim, c.rope_base, c.rope_scaling, device),
                             persistent=False)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length

    def hidden(self, idx: Tensor, input_pos: Optional[Tensor] = None, *, cache_pos: Optional[Tensor] = None,
               mask: Optional[Tensor] = None) -> Tensor:
        """The final-norm hidden state [B, S, dim], the input of `output` (and of Medusa heads).

        idx [B, S] token ids. input_pos [S] or [B, S]: RoPE positions (rows may differ). cache_pos [B, S]: KV slots
        to write, default input_pos. mask [B or 1, 1, S, max_seq_length] bool, True = may attend: default causal by
        slot (and the sliding window). Without setup_caches, idx is a whole sequence and attention is plain causal.
        """
        B, S = idx.shape
        x = self.tok_embeddings(idx)
        if not self.has_cache:  # training and perplexity
            c = self.config
            rope = rope_table(S, c.head_dim, c.rope_base, c.rope_scaling, idx.device)[None]
            if mask is None and c.sliding_window is not None and S > c.sliding_window:
                mask = causal_mask(torch.arange(S, device=idx.device)[None], S, c.sliding_window)
            for layer in self.layers:
                x = layer(x, rope, None, mask)
            return self.norm(x)
        if input_pos is None:
            raise ValueError("input_pos is required once setup_caches has been called")
        input_pos = input_pos.expand(B, S)
        cache_pos = input_pos if cache_pos is None else cache_pos.expand(B, S)
        if mask is None:
            mask = causal_mask(cache_pos, self.max_seq_length, self.config.sliding_window)
        rope = self.rope[input_pos]  # [B, S, head_dim/2, 2]
        for layer in self.layers:
            x = layer(x, rope, cache_pos, mask)
        return self.norm(x)

    def forward(self, idx: Tensor, input_pos: Optional[Tensor] = None, *, cache_pos: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        """Logits [B, S, vocab_size]; arguments as in `hidden`."""
        return self.output(self.hidden(idx, input_pos, cache_pos=cache_pos, mask=mask))


def causal_mask(query_pos: Tensor, n_keys: int, sliding_window: Optional[int] = None) -> Tensor:
    """[B, 1, S, n_keys] bool from query slots [B, S]: each query sees the slots up to its own (and, with a
    sliding window, only the last `sliding_window` of them)."""
    slots = torch.arange(n_keys, device=query_pos.device)
    query = query_pos[:, None, :, None]
    mask = slots <= query
    if sliding_window is not None:
        mask &= slots > query - sliding_window
    return mask


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, rope, cache_pos, mask):
        h = x + self.attention(self.attention_norm(x), rope, cache_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        # Head counts are attributes, not read from config, so that tensor parallelism can shard them.
        self.n_head, self.n_kv_heads, self.head_dim = config.n_head, config.n_kv_heads, config.head_dim
        self.wqkv = nn.Linear(config.dim, (config.n_head + 2 * config.n_kv_heads) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, rope, cache_pos, mask):
        B, S, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(B, S, self.n_head, self.head_dim), rope).transpose(1, 2)  # (B, H, S, D)
        k = apply_rope(k.view(B, S, self.n_kv_heads, self.head_dim), rope).transpose(1, 2)  # (B, H_kv, S, D)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        group = self.n_head // self.n_kv_heads
        if self.kv_cache is None:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        else:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, H_kv, max_seq_length, D)
            # GQA without copying the cache: the `group` query heads that share a kv head are stacked along the
            # query axis, (B, H, S, D) -> (B, H_kv, group*S, D), and the mask is repeated to match.
            q = q.reshape(B, self.n_kv_heads, group * S, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, group, 1))
        y = y.reshape(B, self.n_head, S, self.head_dim).transpose(1, 2).reshape(B, S, -1)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(head_dim: int, base: float, scaling: Optional[dict]) -> Tensor:
    # fp32, as Meta's reference and transformers compute it: the angles the checkpoints were trained with.
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return freqs
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band between interpolated.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = ((old_context / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * freqs / factor + smooth * freqs


def rope_table(seq_len: int, head_dim: int, base: float, scaling: Optional[dict], device=None) -> Tensor:
    """[seq_len, head_dim/2, 2] fp32 (cos, sin) of position * frequency."""
    freqs = rope_frequencies(head_dim, base, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(device)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """x [B, S, H, D], rope [B, S, D/2, 2]: rotate each interleaved pair (x[2i], x[2i+1]) by its angle, in fp32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rope = rope[:, :, None]  # broadcast over heads
    cos, sin = rope[..., 0], rope[..., 1]
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)
