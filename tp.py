"""Tensor parallelism: every block's matmuls split across the GPUs of a torchrun job, one all-reduce after attention
and one after the feed-forward.

    torchrun --standalone --nproc_per_node=8 generate.py --compile \
        --checkpoint_path checkpoints/meta-llama/Llama-2-70b-chat-hf/model.pth

Megatron's split. wqkv, w1 and w3 are column-parallel: each rank computes its own heads and its own slice of the
hidden width, with no communication. wo and w2 are row-parallel: each rank multiplies its slice of their inputs and
the partial sums are all-reduced. The embedding, the norms and the output head are replicated, so every rank holds
the whole logits and, seeded alike, samples the same token: ranks never exchange tokens, only the two sums per block.
Each rank reads only its own slices from the memory-mapped checkpoint, so no process ever holds the whole model.
Fewer kv heads than ranks (8 on 16) are replicated: each rank keeps the one kv head its query heads use.

Needs model.py only: a quantized Linear (quantize.py, anyprec.py) cuts its own tensors, through its `shard` method.
"""
import atexit
import contextlib
import os
import random
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from model import Attention, FeedForward, Transformer, narrow_ranges


def maybe_init_dist(device="cuda", timeout: float = 600) -> Optional[int]:
    """Join the torchrun job this process belongs to (NCCL on CUDA, gloo on CPU) and return its rank; None when the
    process was not started by torchrun with more than one rank. Each rank takes GPU LOCAL_RANK of its machine.
    A collective that waits more than `timeout` seconds for another rank fails (see stalls_end_the_job)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device} under torchrun: use --device cuda, each rank takes GPU LOCAL_RANK")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"torchrun started more ranks on this machine than its {torch.cuda.device_count()} "
                             f"GPUs: lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
    elif device.type != "cpu":
        raise ValueError(f"tensor parallelism runs on cuda (NCCL) or cpu (gloo), not on {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        atexit.register(_leave, timeout)
    return rank


def _leave(timeout: float):
    if not dist.is_initialized():  # a stall already tore the group down
        return
    if dist.get_backend() == "gloo":  # gloo aborts at exit while a peer's last transfer is still in flight
        dist.monitored_barrier(timeout=timedelta(seconds=timeout))  # raises, rather than hangs, if a rank has died
    dist.destroy_process_group()


@contextlib.contextmanager
def stalls_end_the_job(timeout: float):
    """A collective that timed out (another rank stopped, hung or died) becomes one clear error on this rank, and
    the group is torn down so that nothing waits again at exit; torchrun then ends the other ranks."""
    try:
        yield
    except RuntimeError as e:
        if not dist.is_initialized() or "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        rank = dist.get_rank()
        dist.destroy_process_group()
        raise ValueError(f"rank {rank} heard nothing from the other ranks for {timeout:g} s (--timeout): one of them "
                         f"stopped, hung or died; ending the job") from None


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ---------------------------------------------------------------------------------------------------------------
# Sharding. Ranges are (start, length) along one dimension of a weight; a rank keeps the same ranges of every
# tensor that describes those rows or columns.

def apply_tp(model: Transformer, rank: Optional[int] = None, world: Optional[int] = None) -> Transformer:
    """Shard every block of `model` in place for this rank of the job (or the rank and world given).

    The weights should still be on the meta device or memory-mapped (load_model(..., tp=True) does this): each rank
    keeps views of its slices, which the copy to the device then reads. Call it before setup_caches, so that the KV
    cache is allocated with this rank's heads only.
    """
    rank = dist.get_rank() if rank is None else rank
    world = world_size() if world is None else world
    if model.has_cache:
        raise ValueError("apply_tp must come before setup_caches: the KV cache is sharded with the heads")
    check_divisible(model, world)
    with torch.no_grad():
        for layer in model.layers:
            shard_attention(layer.attention, rank, world)
            shard_feed_forward(layer.feed_forward, model.config.intermediate_size // world, rank)
            # Row-parallel outputs are this rank's partial sums. A functional collective, so that torch.compile
            # traces it into the graph (no graph break) and a CUDA graph can capture it.
            for row_parallel in (layer.attention.wo, layer.feed_forward.w2):
                row_parallel.register_forward_hook(_all_reduce_output)
    return model


def _all_reduce_output(module, inputs, output):
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def check_divisible(model: Transformer, world: int):
    """A one-line error, with the rank counts that would work, when the model cannot be split `world` ways."""
    c = model.config

    def problem(n):
        if c.n_head % n:
            return f"n_head ({c.n_head}) is not divisible by {n}"
        # With fewer kv heads than ranks, each kv head is replicated on n/n_kv_heads neighbouring ranks.
        if c.n_kv_heads % n and n % c.n_kv_heads:
            return f"n_kv_heads ({c.n_kv_heads}) and {n} do not divide one another"
        if c.intermediate_size % n:
            return f"intermediate_size ({c.intermediate_size}) is not divisible by {n}"
        for name in ("attention.wo", "feed_forward.w2"):  # a quantized layer may cut its inputs in whole groups only
            linear = model.layers[0].get_submodule(name)
            groups = linear.in_features // getattr(linear, "input_multiple", 1)
            if groups % n:
                return f"{name}'s {groups} groups of inputs are not divisible by {n} (smaller groups help)"
        return None

    if problem(world) is not None:
        works = [n for n in range(1, c.n_head + 1) if problem(n) is None]
        raise ValueError(f"cannot split this model across {world} ranks: {problem(world)}; "
                         f"use --nproc_per_node in {works}")


def shard_attention(attention: Attention, rank: int, world: int):
    D, n_head, n_kv = attention.head_dim, attention.n_head, attention.n_kv_heads
    heads, kv_heads = n_head // world, max(n_kv // world, 1)
    first_kv = rank * n_kv // world  # with fewer kv heads than ranks: the one kv head this rank's queries use
    q_rows, kv_rows = n_head * D, n_kv * D
    # wqkv's rows are q (n_head heads), then k and v (n_kv heads each): keep this rank's heads of each, re-fused.
    shard_linear(attention.wqkv, 0, [(rank * heads * D, heads * D), (q_rows + first_kv * D, kv_heads * D),
                                     (q_rows + kv_rows + first_kv * D, kv_heads * D)])
    shard_linear(attention.wo, 1, [(rank * heads * D, heads * D)])
    attention.n_head, attention.n_kv_heads = heads, kv_heads


def shard_feed_forward(feed_forward: FeedForward, width: int, rank: int):
    shard_linear(feed_forward.w1, 0, [(rank * width, width)])
    shard_linear(feed_forward.w3, 0, [(rank * width, width)])
    shard_linear(feed_forward.w2, 1, [(rank * width, width)])


def shard_linear(linear: nn.Module, dim: int, ranges: list[tuple[int, int]]):
    """Keep `ranges` of the output features (dim 0: column-parallel) or of the input features (dim 1: row-parallel).
    A quantized Linear cuts its own tensors in its own layout (its `shard` method)."""
    if not isinstance(linear, nn.Linear):
        if not hasattr(linear, "shard"):
            raise ValueError(f"tensor parallelism cannot split {type(linear).__name__} layers")
        return linear.shard(dim, ranges)
    linear.weight = nn.Parameter(narrow_ranges(linear.weight, dim, ranges), requires_grad=False)
    linear.out_features, linear.in_features = linear.weight.shape


def shard_state_dict(model: Transformer, state: dict) -> dict:
    """Shard the meta-device `model` and return this rank's slices of the memory-mapped checkpoint `state`.

    The model takes the mapped tensors themselves (nothing is read), apply_tp narrows them, and the state dict of the
    result holds views of this rank's slices: the caller's copy to the device reads 1/world of the layers (and the
    replicated embedding and head); only a row-parallel any-precision layer is read whole, to be repacked.
    """
    for name, tensor in state.items():  # setattr, not load_state_dict: no module's load hook sees the whole tensors
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        parameter = isinstance(getattr(module, leaf), nn.Parameter)
        setattr(module, leaf, nn.Parameter(tensor, requires_grad=False) if parameter else tensor)
    apply_tp(model)
    sharded = model.state_dict()
    return {name: sharded[name] for name in state}


# ---------------------------------------------------------------------------------------------------------------
# Keeping the ranks in step: they must sample alike and read the same input.

def seed_all_ranks(seed: Optional[int] = None) -> int:
    """Seed every rank with `seed` (or rank 0's random choice): from the same logits they then draw the same tokens."""
    choice = torch.tensor([random.randrange(2**62) if seed is None else seed], device=_collective_device())
    dist.broadcast(choice, src=0)
    seed = int(choice.item())
    torch.manual_seed(seed)
    return seed


def input_from_rank0(prompt: str = "") -> str:
    """input() read on rank 0 and sent to every rank; EOF on rank 0 is EOFError everywhere."""
    line = [None]
    if dist.get_rank() == 0:
        try:
            line = [input(prompt)]
        except EOFError:
            pass
    dist.broadcast_object_list(line, src=0)  # pickle, but only between the ranks of our own job
    if line[0] is None:
        raise EOFError
    return line[0]


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
