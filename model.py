"""Llama-family transformer: GQA, RoPE (with Llama 3.1 scaling), RMSNorm, SwiGLU and a static KV cache.

Weights use gpt-fast's layout: q, k and v fused into one `wqkv`, and q/k rows permuted at conversion so that RoPE
rotates interleaved pairs (Meta's convention). Positions are tensors everywhere the decode loop runs, so one
compiled graph serves every step.
"""
import contextlib
import copy
import difflib
import errno
import io
import itertools
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints/tiny-py/model.pth"  # the shipped tiny model


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
    rope_scaling: Optional[dict] = None  # Llama 3.1: factor, low/high_freq_factor, original_max_position_embeddings
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sliding_window: Optional[int] = None  # Mistral v0.1: a query sees only the last `sliding_window` keys

    def __post_init__(self):
        self.check()
        if self.n_kv_heads == -1:
            self.n_kv_heads = self.n_head
        if self.head_dim == -1:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_heads {self.n_kv_heads}")

    def check(self):
        """Every value of the right type and range: a damaged config fails here, not as garbage output."""
        def number(value):
            return type(value) in (int, float) and math.isfinite(value) and value > 0
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "dim", "intermediate_size", "n_kv_heads",
                     "head_dim", "sliding_window"):
            value = getattr(self, name)
            optional = name in ("n_kv_heads", "head_dim") and value == -1 or name == "sliding_window" and value is None
            if not optional and (type(value) is not int or value < 1):
                raise ValueError(f"{name} is {value!r}: it must be a positive integer")
        for name in ("rope_base", "norm_eps"):
            if not number(getattr(self, name)):
                raise ValueError(f"{name} is {getattr(self, name)!r}: it must be a positive number")
        if type(self.tie_embeddings) is not bool:
            raise ValueError(f"tie_embeddings is {self.tie_embeddings!r}: it must be true or false")
        scaling = self.rope_scaling
        keys = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        if scaling is not None and not (isinstance(scaling, dict) and set(scaling) == keys and
                                        all(map(number, scaling.values())) and
                                        scaling["high_freq_factor"] > scaling["low_freq_factor"]):
            raise ValueError(f"rope_scaling is {scaling!r}: it must be null or hold positive {sorted(keys)} "
                             f"(high_freq_factor > low_freq_factor)")

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
        try:
            config = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}): re-run scripts/convert_hf_checkpoint.py") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} is not a JSON object: re-run scripts/convert_hf_checkpoint.py")
        unknown = set(config) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; re-run scripts/convert_hf_checkpoint.py")
        try:
            return cls(**config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

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
        with atomic_write(path) as f:
            f.write((json.dumps(asdict(self), indent=2) + "\n").encode())


@contextlib.contextmanager
def atomic_write(path):
    """A binary file to write `path` through: a unique temporary name in the same folder, flushed to disk and renamed
    to `path` only when the block completes, so `path` never holds a half-written file or a mix of two runs.

    The temporary name carries the writer's process id: leftovers of a killed run are removed by the next write to
    the same folder. A full disk is a one-line error naming the folder, even where a writer (torch.save) hides the
    cause behind an error of its own.
    """
    path = Path(path)
    _remove_leftovers(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".partial")
    try:
        with _Recording(os.fdopen(fd, "wb", buffering=0)) as f:
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            except Exception:
                if f.no_space:
                    raise ValueError(f"no space left on the disk of {path.parent} while writing {path.name}: free "
                                     f"some space and run again") from None
                raise
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600, as if written by open()
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class _Recording(io.BufferedWriter):
    """Remembers whether a write failed for want of space (a full disk, a quota or a file-size limit)."""
    no_space = False

    def write(self, data):
        try:
            return super().write(data)
        except OSError as e:
            self.no_space = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            raise

    def flush(self):
        try:
            return super().flush()
        except OSError as e:
            self.no_space = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            raise


def _remove_leftovers(folder: Path):
    for leftover in folder.glob(".*.partial"):
        try:
            os.kill(int(leftover.name.split(".")[-3]), 0)  # the writer is alive: its file is in progress
        except ProcessLookupError:
            leftover.unlink(missing_ok=True)
        except (ValueError, IndexError, PermissionError):
            pass


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


def load_state(path, unquantized: bool = False) -> dict:
    """The tensors of a checkpoint file, memory-mapped. Only tensors and plain containers are unpickled
    (weights_only): a checkpoint is untrusted input. unquantized: refuse a file that quantize.py or anyprec.py made
    (the quantizers start from the original)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give the checkpoint file in it, e.g. {path / 'model.pth'}")
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found: run scripts/prepare.sh <hf_repo_id> for a Hugging Face model "
            f"(e.g. scripts/prepare.sh meta-llama/Llama-2-7b-chat-hf), or scripts/train_tiny.py for the tiny model")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated, empty, random bytes, or a pickle of anything but tensors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({reason[:200]}): it is damaged or not a PyTorch "
                         f"state dict; convert or download it again") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors: convert the model with "
                         f"scripts/convert_hf_checkpoint.py")
    if unquantized and "quantization" in state:
        raise ValueError(f"{path} is already quantized ({state['quantization'].get('mode')}): quantize the original "
                         f"bf16 model.pth")
    return state


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

    def move(self, src: Tensor, dst: Tensor):
        """Copy each row's slots src [B, n] to its slots dst [B, n]: all gathered before any is written, so a
        slot may be both a source and a destination (Medusa moves an accepted tree path into place this way)."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        for cache in (self.k_cache, self.v_cache):
            cache[rows, :, dst] = cache[rows, :, src]  # indexed view [B, n, H_kv, D]


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size)
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

    def remove_caches(self):
        """Back to whole sequences: no KV cache until setup_caches makes one."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.max_batch_size = self.max_seq_length = -1

    def twin(self) -> "Transformer":
        """A second model on the same weights (no tensor is copied) without a KV cache, so that it can have one of
        its own: a self-speculation draft, or a generator beside a model that scores whole sequences."""
        shared = {id(t): t for t in itertools.chain(self.parameters(), self.buffers())}
        twin = copy.deepcopy(self, memo=shared)
        twin.remove_caches()
        return twin

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
            rope, causal = self.sequence_context(S, idx.device)
            for layer in self.layers:
                x = layer(x, rope, None, causal if mask is None else mask)
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

    def sequence_context(self, S: int, device) -> tuple[Tensor, Optional[Tensor]]:
        """(rope [1, S, head_dim/2, 2], mask) for whole sequences of S tokens without a cache: the mask is None
        (plain causal attention) unless a sliding window is shorter than S."""
        c = self.config
        rope = rope_table(S, c.head_dim, c.rope_base, c.rope_scaling, device)[None]
        if c.sliding_window is None or S <= c.sliding_window:
            return rope, None
        return rope, causal_mask(torch.arange(S, device=device)[None], S, c.sliding_window)

    def forward(self, idx: Tensor, input_pos: Optional[Tensor] = None, *, cache_pos: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        """Logits [B, S, vocab_size]; arguments as in `hidden`."""
        return self.output(self.hidden(idx, input_pos, cache_pos=cache_pos, mask=mask))


def linear_names(model: Transformer, include_output: bool = True) -> list[str]:
    """The Linears a weight-only quantizer replaces: every one in the blocks, and the output head unless it is the
    embedding table (tied) or include_output is False."""
    tied = model.config.tie_embeddings
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (name != "output" or include_output and not tied)]


def narrow_ranges(t: Tensor, dim: int, ranges: list[tuple[int, int]]) -> Tensor:
    """The (start, length) ranges of t along dim, concatenated. One range is a view: of a memory-mapped tensor,
    nothing is read until the copy to the device (generate.load_model's, which also makes it contiguous)."""
    parts = [t.narrow(dim, start, length) for start, length in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


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
        self.wqkv = Linear(config.dim, (config.n_head + 2 * config.n_kv_heads) * config.head_dim)
        self.wo = Linear(config.n_head * config.head_dim, config.dim)
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
        elif S == 1 and x.device.type == "cpu" and torch.compiler.is_compiling():
            # A CPU decode step under inductor: written out one query head at a time, with k and v repeated by
            # index, inductor fuses the cache write and all of attention into one loop that copies nothing. PyTorch's
            # CPU flash kernel, or the stacked heads below (a product of `group` rows), cost ~10% of a tiny-model step.
            k, v = self.kv_cache.update(cache_pos, k, v)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
        self.w1 = Linear(config.dim, config.intermediate_size)  # gate
        self.w3 = Linear(config.dim, config.intermediate_size)  # up
        self.w2 = Linear(config.intermediate_size, config.dim)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """F.linear without a bias. A single row on a CPU under torch.compile is written as a product and a sum, which
    inductor turns into one vectorised loop streaming the weight: about 2x faster in bf16 here (2-core EPYC, torch
    2.13) than the matrix product it calls otherwise, which wins from two rows on."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.shape[:-1].numel() == 1:
        return (x.float()[..., None, :] * weight.float()).sum(-1).to(x.dtype)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """nn.Linear without a bias (the Llama family has none), computed by `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return linear(x, self.weight)


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
