"""Any-precision models: one file in the memory of an 8-bit model holds every width from 3 to 8 bits, chosen at
run time (Park et al., "Any-Precision LLM", ICML 2024).

    python anyprec.py --checkpoint_path checkpoints/tiny-py/model.pth      # writes model_anyprec.3-8.pth beside it
    python generate.py --checkpoint_path checkpoints/tiny-py/model_anyprec.3-8.pth --precision 4
    python eval.py --checkpoint_path checkpoints/tiny-py/model_anyprec.3-8.pth --precision 3

How: every output row of every block Linear gets a Fisher-weighted 1-D k-means at the seed width (3 bits: 8
centroids). Each step up to the parent width splits every cluster of the row in two (the best split of its sorted
segment), so the (n+1)-bit code of a weight is its n-bit code with one more bit below, and the n-bit tables never
change. The parent codes are stored as bitplanes, most significant first: precision p reads the first p planes
and the p-bit table of each row, nothing else. Tables are fp16: 10 mantissa bits keep the 256 levels of an 8-bit
row apart (bf16's 7 would merge neighbours), and the kernels widen them to fp32 in shared memory.

Runtime: AnyPrecLinear replaces nn.Linear at load (generate.load_model does it for any file with a "quantization"
entry). On CUDA, 1..8 tokens run a bitplane GEMV kernel and longer inputs dequantise then matmul; elsewhere a
gather from the tables computes the same function. The precision is a Python int on each module, so torch.compile
specialises one graph (one CUDA graph) per precision. For self-speculation, `at_precision(model, 3)` gives a
draft that shares every weight with the 8-bit target.
"""
import argparse
import copy
import functools
import itertools
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

QUANTIZED = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
MIN_BITS, MAX_BITS = 3, 8  # the kernels' range: below 3 bits quality collapses (the paper leaves 2 out too)
FISHER_FLOOR = 1e-6  # relative to the row's mean Fisher; see quantize_linear
GEMV_MAX_TOKENS = 8  # up to this many tokens a call runs the GEMV kernel; more dequantise the weight first


# ---------------------------------------------------------------------------------------------------------------
# Bitplane layout. qweight is int32 [planes, N, Kp/32] (Kp = K rounded up to 32, padded with code 0); plane j
# holds bit (parent-1-j) of every parent code, so the p-bit code is the first p planes. Each row is cut into
# chunks of 1024 weights and lane t (0..31) of a warp owns word 32i + t of chunk i in every plane: a warp's plane
# load is 128 contiguous bytes. In that word, byte L (bits 31-8L .. 24-8L) holds weights 1024i + 256L + 8t + b,
# b = 0..7 from the byte's top bit down, so each lane's activations are four runs of 8 contiguous values (four
# 16-byte loads). A final partial chunk of T = (Kp mod 1024)/32 words uses 8T in place of 256.
# Tensor parallelism: column-parallel slices rows (dim 1 of qweight, dim 0 of the tables); row-parallel must
# unpack, slice K and pack again (the chunks do not survive a cut at, say, 11008/2).

def padded(in_features: int) -> int:
    return -(-in_features // 32) * 32


def _chunk_shape(Kp: int):
    """(full 1024-weight chunks, words in the final partial chunk)."""
    return Kp // 1024, Kp % 1024 // 32


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [N, K] of `bits` bits -> int32 bitplanes [bits, N, Kp/32], most significant plane first."""
    N, K = codes.shape
    Kp = padded(K)
    codes = F.pad(codes.to(torch.int64), (0, Kp - K))
    full, tail = _chunk_shape(Kp)
    shifts = 31 - 8 * torch.arange(4, device=codes.device)[:, None] - torch.arange(8, device=codes.device)  # [L, b]
    planes = []
    for j in range(bits):
        bit = (codes >> (bits - 1 - j)) & 1
        head = bit[:, : 1024 * full].reshape(N, full, 4, 32, 8)  # [N, chunk, L, t, b]
        words = (head << shifts[:, None, :]).sum((2, 4)).flatten(1)  # [N, 32*full]
        if tail:
            end = bit[:, 1024 * full:].reshape(N, 4, tail, 8)
            words = torch.cat([words, (end << shifts[:, None, :]).sum((1, 3))], dim=1)
        planes.append(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))  # uint32 bits in int32
    return torch.stack(planes)


def unpack(qweight: Tensor, bits: int, in_features: int = None) -> Tensor:
    """int32 bitplanes [planes, N, Kp/32] -> uint8 codes [N, in_features or Kp] at precision `bits` (top planes)."""
    _, N, words = qweight.shape
    Kp = 32 * words
    full, tail = _chunk_shape(Kp)
    shifts = 31 - 8 * torch.arange(4, device=qweight.device)[:, None] - torch.arange(8, device=qweight.device)
    codes = torch.zeros(N, Kp, dtype=torch.uint8, device=qweight.device)
    for j in range(bits):
        w = qweight[j].to(torch.int64) & 0xFFFFFFFF
        head = (w[:, : 32 * full].reshape(N, full, 1, 32, 1) >> shifts[:, None, :]) & 1  # [N, chunk, L, t, b]
        bit = [head.flatten(1)]
        if tail:
            bit.append(((w[:, 32 * full:].reshape(N, 1, tail, 1) >> shifts[:, None, :]) & 1).flatten(1))
        codes |= (torch.cat(bit, dim=1) << (bits - 1 - j)).to(torch.uint8)
    return codes[:, :in_features] if in_features else codes


def dequantize(qweight: Tensor, lut: Tensor, bits: int, in_features: int = None) -> Tensor:
    """The weight [N, K] at precision `bits`, in the tables' dtype: what every kernel must compute with."""
    return lut.gather(1, unpack(qweight, bits, in_features).long())


# ---------------------------------------------------------------------------------------------------------------
# Quantization: sensitivity, seed k-means, incremental upscaling. Vectorised over rows; every row is sorted once
# and all segment statistics come from float64 prefix sums, so a cluster's mean or a split's cost is O(1).

def fisher_diag(model: nn.Module, windows: Tensor, progress=True) -> dict:
    """Diagonal empirical Fisher of every quantized Linear: sum over sequences of (dLoss/dW)^2, one sequence per
    backward (the square of a sequence's gradient, not of each token's), accumulated in fp32."""
    from tqdm import tqdm
    targets = {name: m.weight for name, m in model.named_modules() if name.endswith(QUANTIZED)}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in targets.values():
        w.requires_grad_(True)
    fisher = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in targets.items()}
    device = next(iter(targets.values())).device
    for tokens in tqdm(windows, desc="fisher", disable=not progress):
        tokens = tokens[None].to(device)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[0, 1:]).backward()
        for name, w in targets.items():
            fisher[name] += w.grad.float().square()
            w.grad = None
    for w in targets.values():
        w.requires_grad_(False)
    return fisher


def _prefix(values: Tensor) -> Tensor:
    """[R, K] -> [R, K+1] float64 running sums starting at 0: the sum over [a, b) is P[b] - P[a]."""
    return F.pad(values.cumsum(1), (1, 0))


def _segment_means(P0, P1, borders, fallback):
    """Weighted mean of each segment [borders[c], borders[c+1]); an empty one keeps `fallback`."""
    mass, weighted = (P.gather(1, borders).diff(dim=1) for P in (P0, P1))
    return torch.where(mass > 0, weighted / torch.where(mass > 0, mass, 1), fallback)


def _segment_of(borders: Tensor, K: int) -> Tensor:
    """[R, K] index of the segment holding each sorted position."""
    position = torch.arange(K, device=borders.device).expand(borders.shape[0], K).contiguous()
    return torch.searchsorted(borders[:, 1:-1].contiguous(), position, right=True)


def best_cuts(ws: Tensor, s: Tensor, borders: Tensor) -> Tensor:
    """Cut every segment of every row in two where its weighted SSE is least (exactly: every cut is scored at
    once). Segment c of `borders` [R, k+1] becomes segments 2c, 2c+1 of the returned borders [R, 2k+1]."""
    R, K = ws.shape
    segment = _segment_of(borders, K)
    start, end = borders.gather(1, segment), borders.gather(1, segment + 1)
    P0, P1 = _prefix(s), _prefix(s * ws)
    # Cut after sorted weight m: left [start, m+1), right [m+1, end); cutting at the end leaves the segment whole.
    L0, L1 = P0[:, 1:] - P0.gather(1, start), P1[:, 1:] - P1.gather(1, start)
    R0, R1 = P0.gather(1, end) - P0[:, 1:], P1.gather(1, end) - P1[:, 1:]
    gain = L1.square() / L0 + R1.square() / torch.where(R0 > 0, R0, 1)  # weighted SSE = sum(s w^2) - gain
    cut = torch.arange(1, K + 1, device=ws.device).expand(R, K)
    tie = torch.cat([ws[:, 1:] == ws[:, :-1], torch.zeros(R, 1, dtype=torch.bool, device=ws.device)], dim=1)
    gain = torch.where(tie & (cut < end), -torch.inf, gain)  # equal weights keep equal codes
    k = borders.shape[1] - 1
    best = torch.full((R, k), -torch.inf, dtype=gain.dtype, device=ws.device).scatter_reduce(1, segment, gain, "amax")
    first = torch.where(gain == best.gather(1, segment), cut, K)  # the first best cut: deterministic
    split = torch.full_like(borders[:, 1:], K).scatter_reduce(1, segment, first, "amin")
    split = torch.minimum(split, borders[:, 1:])  # an empty segment has no cut: two empty halves
    return torch.cat([torch.stack([borders[:, :-1], split], dim=2).flatten(1), borders[:, -1:]], dim=1)


def _draw(weights: Tensor, n: int, generator) -> Tensor:
    """n indices per row drawn with probability proportional to `weights` [R, K] (inverse CDF)."""
    cdf = weights.cumsum(1)
    u = torch.rand(weights.shape[0], n, generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=weights.shape[1] - 1)


def kmeans_rows(ws: Tensor, s: Tensor, bits: int, iters: int = 50):
    """Weighted 1-D k-means with k = 2^bits clusters of every row of sorted ws [R, K] (weights s > 0).

    Starts as upstream does, greedy k-means++: each new centre is the best of 2 + ln k candidates drawn in
    proportion to s * D^2, by the weighted SSE it removes (scored in O(log K) from prefix sums). Then Lloyd, and
    re-cutting every pair of neighbouring clusters at the best cut of their union (a move Lloyd's midpoints cannot
    make), in turn until neither moves a border. Deterministic: a seeded generator. Returns borders [R, k+1]
    (cluster c is the sorted segment [borders[c], borders[c+1])) and sorted centroids [R, k]."""
    R, K = ws.shape
    k, device = 2**bits, ws.device
    generator = torch.Generator(device).manual_seed(0)
    P0, P1, P2 = _prefix(s), _prefix(s * ws), _prefix(s * ws * ws)

    def sse(a, b, x):  # sum over [a, b) of s (w - x)^2
        S0, S1, S2 = (P.gather(1, b) - P.gather(1, a) for P in (P0, P1, P2))
        return S2 - 2 * x * S1 + x * x * S0

    centres = ws.gather(1, _draw(s, 1, generator))  # [R, j], kept sorted
    d2 = (ws - centres).square()
    for j in range(1, k):
        candidates = ws.gather(1, _draw(s * d2, 2 + int(math.log(k)), generator))  # [R, t]
        at = torch.searchsorted(centres, candidates)
        left, right = centres.gather(1, (at - 1).clamp(min=0)), centres.gather(1, at.clamp(max=j - 1))
        has_left, has_right = at > 0, at < j
        # A candidate takes the weights between its midpoints with its neighbours, now split between them.
        a = torch.where(has_left, torch.searchsorted(ws, (left + candidates) / 2), 0)
        b = torch.where(has_right, torch.searchsorted(ws, (candidates + right) / 2), K)
        m = torch.where(has_left & has_right, torch.searchsorted(ws, (left + right) / 2), torch.where(has_left, b, a))
        m = torch.minimum(torch.maximum(m, a), b)
        gain = sse(a, m, left) + sse(m, b, right) - sse(a, b, candidates)
        best = gain.argmax(1, keepdim=True)
        chosen, at = candidates.gather(1, best), at.gather(1, best)
        slot = torch.arange(j + 1, device=device)  # insert `chosen` at `at`: centres stay sorted
        centres = torch.where(slot == at, chosen, centres.gather(1, (slot - (slot > at).long()).clamp(max=j - 1)))
        d2 = torch.minimum(d2, (ws - chosen).square())

    borders = torch.cat([torch.zeros_like(centres[:, :1], dtype=torch.int64),
                         torch.searchsorted(ws, (centres[:, 1:] + centres[:, :-1]) / 2),
                         torch.full_like(centres[:, :1], K, dtype=torch.int64)], dim=1)
    centroids = _segment_means(P0, P1, borders, centres)
    rows = torch.arange(R, device=device)  # the rows still moving
    for _ in range(iters):
        w, weight, P = ws[rows], s[rows], (P0[rows], P1[rows])
        moved, c = borders[rows], centroids[rows]
        for _ in range(iters):  # Lloyd: each weight to its nearest centroid (cut at the midpoints), re-centre
            lloyd = torch.cat([moved[:, :1], torch.searchsorted(w, (c[:, 1:] + c[:, :-1]) / 2), moved[:, -1:]], 1)
            if torch.equal(lloyd, moved):
                break
            moved, c = lloyd, _segment_means(*P, lloyd, c)
        # Pairs (0,1), (2,3), ... re-cut as one segment each; then (1,2), (3,4), ... with the end clusters kept.
        moved = best_cuts(w, weight, moved[:, ::2])
        pairs = best_cuts(w, weight, torch.cat([moved[:, :1], moved[:, 1:-1:2], moved[:, -1:]], dim=1))
        moved = torch.cat([pairs[:, :1], pairs[:, 2:-2], pairs[:, -1:]], dim=1)
        still = (moved != borders[rows]).any(1)
        borders[rows], centroids[rows] = moved, _segment_means(*P, moved, c)
        rows = rows[still]
        if rows.numel() == 0:
            break
    return borders, centroids


def quantize_linear(weight: Tensor, fisher: Tensor, seed: int = 3, parent: int = 8, rows_per_chunk: int = None):
    """weight, fisher [N, K] -> (parent codes uint8 [N, K], {p: fp16 table [N, 2^p]} for p = seed..parent)."""
    N, K = weight.shape
    rows_per_chunk = rows_per_chunk or max(1, 2**24 // K)
    codes, luts = [], {p: [] for p in range(seed, parent + 1)}
    for first in range(0, N, rows_per_chunk):
        w = weight[first: first + rows_per_chunk].double()
        f = fisher[first: first + rows_per_chunk].double()
        # Each row's Fisher scaled to mean 1 (the clustering is unchanged), a row without any taken as uniform,
        # and floored at FISHER_FLOOR: segment sums are differences of float64 prefix sums over the whole row,
        # exact to ~1e-16 of the row's mass, so a cluster far lighter than that would get a meaningless mean.
        mean = f.mean(1, keepdim=True)
        f = torch.where(mean > 0, f / torch.where(mean > 0, mean, 1), 1.0).clamp(min=FISHER_FLOOR)
        ws, order = torch.sort(w, dim=1, stable=True)
        s = f.gather(1, order)
        borders, centroids = kmeans_rows(ws, s, seed)
        luts[seed].append(centroids.half())
        P0, P1 = _prefix(s), _prefix(s * ws)
        for p in range(seed + 1, parent + 1):  # upscaling: cluster c of p-1 bits becomes 2c and 2c+1 of p bits
            borders = best_cuts(ws, s, borders)
            centroids = _segment_means(P0, P1, borders, centroids.repeat_interleave(2, dim=1))
            luts[p].append(centroids.half())
        sorted_codes = _segment_of(borders, K)
        codes.append(torch.empty_like(sorted_codes).scatter_(1, order, sorted_codes).to(torch.uint8))
    return torch.cat(codes), {p: torch.cat(t) for p, t in luts.items()}


def check_widths(seed: int, parent: int):
    if not MIN_BITS <= seed <= parent <= MAX_BITS:
        raise ValueError(f"need {MIN_BITS} <= --seed_precision <= --parent_precision <= {MAX_BITS}, "
                         f"got {seed} and {parent}")


def quantize_state(state: dict, fisher: dict, seed: int = 3, parent: int = 8, device="cpu", progress=True):
    """A bf16 state dict -> the any-precision state dict (block Linears as qweight + lut{p}), and the relative
    squared error ||W - W_p||^2 / ||W||^2 of the quantized weights at each width."""
    from tqdm import tqdm
    check_widths(seed, parent)
    out, error, total = dict(state), {p: 0.0 for p in range(seed, parent + 1)}, 0.0
    for name in tqdm(sorted(fisher), desc="anyprec", disable=not progress):
        weight = state[f"{name}.weight"].to(device, torch.float32)
        codes, luts = quantize_linear(weight, fisher[name].to(device), seed, parent)
        del out[f"{name}.weight"]
        out[f"{name}.qweight"] = pack(codes, parent).cpu()
        for p, lut in luts.items():
            out[f"{name}.lut{p}"] = lut.cpu()
            error[p] += (lut.float().gather(1, (codes >> (parent - p)).long()) - weight).square().sum().item()
        total += weight.square().sum().item()
    out["quantization"] = {"mode": "anyprec", "seed_precision": seed, "parent_precision": parent, "layout": 1}
    return out, {p: e / total for p, e in error.items()}


def quantize(checkpoint_path, seed=3, parent=8, calibration_file=None, calibration_samples=128,
             calibration_seq_len=512, device="cpu", progress=True):
    """Write DIR/model_anyprec.{seed}-{parent}.pth beside the checkpoint; returns (path, relative error per width)."""
    from eval import calibration_windows
    from generate import load_model
    from tokenizer import load_tokenizer
    check_widths(seed, parent)
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if "quantization" in state:
        raise ValueError(f"{path} is already quantized ({state['quantization'].get('mode')}): start from the bf16 "
                         f"model.pth")
    model = load_model(path, device, torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    if calibration_seq_len > model.config.block_size:
        raise ValueError(f"--calibration_seq_len {calibration_seq_len} exceeds the model's block_size "
                         f"{model.config.block_size}")
    windows = calibration_windows(load_tokenizer(path.parent), calibration_samples, calibration_seq_len,
                                  calibration_file)
    fisher = fisher_diag(model, windows, progress)
    del model
    out, error = quantize_state(state, fisher, seed, parent, device, progress)
    target = path.with_name(f"model_anyprec.{seed}-{parent}.pth")
    partial = target.with_name(target.name + ".partial")
    torch.save(out, partial)
    partial.replace(target)
    return target, error


# ---------------------------------------------------------------------------------------------------------------
# Runtime.

class AnyPrecLinear(nn.Module):
    """y = x W_p^T with W_p[n, k] = lut{p}[n, code_p[n, k]]: the p-bit code is the top p of the stored planes."""

    def __init__(self, in_features: int, out_features: int, precisions, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.precisions = tuple(sorted(precisions))
        self.precision = max(self.precisions)  # a Python int: compiled graphs specialise on it
        planes = max(self.precisions)
        self.register_buffer("qweight", torch.empty(planes, out_features, padded(in_features) // 32,
                                                    dtype=torch.int32, device=device))
        for p in self.precisions:
            self.register_buffer(f"lut{p}", torch.empty(out_features, 2**p, dtype=torch.float16, device=device))
        self.register_buffer("codes", None, persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # Off CUDA the forward gathers from the tables: unpack the codes once (1 byte a weight, as 8 planes are).
        on_cpu = self.qweight.device.type not in ("cuda", "meta")
        self.codes = unpack(self.qweight, self.qweight.shape[0], self.in_features) if on_cpu else None

    def forward(self, x: Tensor, precision: int = None) -> Tensor:
        p = self.precision if precision is None else precision
        lut = getattr(self, f"lut{p}")
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            x2 = x.reshape(-1, self.in_features)  # [tokens, K]
            if x2.shape[0] <= GEMV_MAX_TOKENS:
                y = torch.ops.anyprec.gemv(x2, self.qweight, lut, p)
            else:
                w = torch.ops.anyprec.dequant(self.qweight, lut, p, x.dtype)  # [N, Kp]
                y = F.linear(F.pad(x2, (0, w.shape[1] - self.in_features)), w)
            return y.reshape(*x.shape[:-1], self.out_features)
        planes = self.qweight.shape[0]
        codes = self.codes if self.codes is not None else unpack(self.qweight, planes, self.in_features)
        return F.linear(x, lut.gather(1, (codes >> (planes - p)).long()).to(x.dtype))

    def bytes_read(self) -> int:
        """What one call reads of the weight at the current precision: p of the planes and the p-bit table."""
        p, (_, N, words) = self.precision, self.qweight.shape
        return p * N * words * 4 + N * 2**p * 2

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, precision={self.precision}, loaded={list(self.precisions)}"


def file_precisions(quantization: dict) -> list:
    return list(range(quantization["seed_precision"], quantization["parent_precision"] + 1))


def swap_linears(model: nn.Module, quantization: dict):
    """Replace the block Linears by AnyPrecLinear (on the Linears' device, meta at load) for the widths loaded."""
    precisions = quantization.get("precisions", file_precisions(quantization))
    for name, module in list(model.named_modules()):
        if name.endswith(QUANTIZED) and isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            swapped = AnyPrecLinear(module.in_features, module.out_features, precisions, module.weight.device)
            setattr(model.get_submodule(parent), child, swapped)
    # One compiled graph (and CUDA graph) per precision a decode function meets.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 + 2 * len(precisions))


def select_precisions(state: dict, quantization, precisions, path="checkpoint") -> tuple:
    """Keep only what `precisions` need, before anything is copied: the first max(precisions) planes of every
    qweight (views of the memory map) and their tables. Returns (state, quantization)."""
    if quantization is None or quantization.get("mode") != "anyprec":
        raise ValueError(f"--precision needs an any-precision checkpoint and {path} is not one: make one with "
                         f"python anyprec.py --checkpoint_path {path}")
    available = file_precisions(quantization)
    precisions = sorted(set(precisions))
    if not precisions or not set(precisions) <= set(available):
        raise ValueError(f"precision {precisions} is outside {path}'s range {available[0]}..{available[-1]}")
    dropped = {f".lut{p}" for p in available if p not in precisions}
    state = {k: (v[: precisions[-1]] if k.endswith(".qweight") else v) for k, v in state.items()
             if not k.endswith(tuple(dropped))}
    return state, {**quantization, "precisions": precisions}


def any_precision_modules(model: nn.Module) -> list:
    modules = [m for m in model.modules() if isinstance(m, AnyPrecLinear)]
    if not modules:
        raise ValueError("not an any-precision model: quantize it first with python anyprec.py --checkpoint_path ...")
    return modules


def set_precision(model: nn.Module, precision: int):
    """Run every AnyPrecLinear of `model` at `precision` bits from now on (no reload; compiled code specialises)."""
    modules = any_precision_modules(model)
    if precision not in modules[0].precisions:
        have = modules[0].precisions
        raise ValueError(f"precision {precision} is not loaded: this model has {have[0]}..{have[-1]}"
                         if list(have) == list(range(have[0], have[-1] + 1)) else
                         f"precision {precision} is not loaded: this model has {list(have)}")
    for m in modules:
        m.precision = precision


def at_precision(model: nn.Module, precision: int) -> nn.Module:
    """A second model that shares every weight and table with `model` (no copy) but runs at `precision`, with no
    KV cache of its own yet: a self-speculation draft is `at_precision(target, 3)` beside the 8-bit target."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    view = copy.deepcopy(model, memo=shared)
    for layer in getattr(view, "layers", ()):
        layer.attention.kv_cache = None
    view.max_batch_size = view.max_seq_length = -1
    set_precision(view, precision)
    return view


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels, built with load_inline on first use. Both read the layout above; both accumulate or convert in
# fp32; both launch on the current stream (so CUDA graphs capture them) and check every bound.

CUDA_SOURCE = r"""
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace {

constexpr int WARPS = 4;  // warps per block: they share the block's rows and take turns over the K chunks

// Activations are bf16 or fp16 (a flag, not a template: half the instances to build), widened to fp32.
__device__ __forceinline__ float2 to_float2(uint32_t pair, bool fp16) {
  if (fp16) return __half22float2(*reinterpret_cast<__half2*>(&pair));
  return make_float2(__uint_as_float(pair << 16), __uint_as_float(pair & 0xffff0000u));  // bf16: an fp32's top half
}
__device__ __forceinline__ uint32_t to_pair(float a, float b, bool fp16) {
  if (fp16) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint16_t to_16bit(float v, bool fp16) {
  return fp16 ? __half_as_ushort(__float2half_rn(v)) : __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// Byte L of plane word q[j] holds bit BITS-1-j of the codes of weights (L, b), weight b at bit 7-b of the byte.
// Gather them so that byte L of codes[b] is the BITS-bit code of weight (L, b): one shift and one masked or per
// plane and b, four bytes (four weights) at a time.
template <int BITS>
__device__ __forceinline__ void bit_transpose(const uint32_t (&q)[BITS], uint32_t (&codes)[8]) {
#pragma unroll
  for (int b = 0; b < 8; b++) {
    uint32_t c = 0;
#pragma unroll
    for (int j = 0; j < BITS; j++) {
      const int shift = (BITS - 1 - j) - (7 - b);
      const uint32_t moved = shift >= 0 ? q[j] << shift : q[j] >> -shift;
      c |= moved & (0x01010101u << (BITS - 1 - j));
    }
    codes[b] = c;
  }
}

template <int BITS, int ROWS>
__device__ __forceinline__ void stage_tables(float (&table)[ROWS][1 << BITS], const __half* __restrict__ lut,
                                             int row0, int N, int thread, int threads) {
  constexpr int ENTRIES = 1 << BITS;
  for (int i = thread; i < ROWS * ENTRIES; i += threads) {
    const int r = i / ENTRIES, entry = i % ENTRIES, row = row0 + r;
    table[r][entry] = row < N ? __half2float(lut[(int64_t)row * ENTRIES + entry]) : 0.f;
  }
}

// out[m, n] = sum_k x[m, k] * lut[n, code(n, k)] for m < tokens <= M. A block owns ROWS rows; its warps take the
// 1024-weight chunks of K in turn, each lane dequantising 32 weights per row per chunk from BITS plane words and
// reusing every x value it loads over the ROWS rows. fp32 tables in shared memory, fp32 accumulation.
template <int BITS, int M, int ROWS>
__global__ void __launch_bounds__(32 * WARPS, 3)
anyprec_gemv_kernel(const uint16_t* __restrict__ x, const uint32_t* __restrict__ qweight,
                    const __half* __restrict__ lut, uint16_t* __restrict__ out, bool fp16, int tokens, int N,
                    int words, int64_t plane_stride) {
  __shared__ float table[ROWS][1 << BITS];
  __shared__ float partial[WARPS][ROWS][M];
  const int lane = threadIdx.x, warp = threadIdx.y, row0 = blockIdx.x * ROWS;
  stage_tables<BITS, ROWS>(table, lut, row0, N, warp * 32 + lane, 32 * WARPS);
  __syncthreads();

  float acc[ROWS][M];
#pragma unroll
  for (int r = 0; r < ROWS; r++)
#pragma unroll
    for (int m = 0; m < M; m++) acc[r][m] = 0.f;
  const int64_t Kp = 32 * (int64_t)words;
  for (int chunk = warp; 32 * chunk < words; chunk += WARPS) {
    const int lanes = min(32, words - 32 * chunk);  // 32, or fewer in a final partial chunk
    if (lane >= lanes) continue;
    uint32_t codes[ROWS][8];
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
      uint32_t q[BITS];
      const bool live = row0 + r < N;
      const uint32_t* src = qweight + (int64_t)(row0 + r) * words + 32 * chunk + lane;
#pragma unroll
      for (int j = 0; j < BITS; j++) q[j] = live ? __ldg(src + j * plane_stride) : 0u;
      bit_transpose<BITS>(q, codes[r]);
    }
    const uint16_t* xs = x + 1024 * (int64_t)chunk + 8 * lane;
#pragma unroll
    for (int L = 0; L < 4; L++) {
      float xf[M][8];  // this lane's 8 activations of run L, per token
#pragma unroll
      for (int m = 0; m < M; m++) {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (m < tokens) v = __ldg(reinterpret_cast<const uint4*>(xs + m * Kp + L * 8 * lanes));
        const uint32_t pairs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const float2 f = to_float2(pairs[i], fp16);
          xf[m][2 * i] = f.x;
          xf[m][2 * i + 1] = f.y;
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; r++)
#pragma unroll
        for (int b = 0; b < 8; b++) {
          const float w = table[r][(codes[r][b] >> (24 - 8 * L)) & 0xff];
#pragma unroll
          for (int m = 0; m < M; m++) acc[r][m] = fmaf(w, xf[m][b], acc[r][m]);
        }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; r++)
#pragma unroll
    for (int m = 0; m < M; m++) {
      float v = acc[r][m];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[warp][r][m] = v;
    }
  __syncthreads();
  for (int i = warp * 32 + lane; i < ROWS * M; i += 32 * WARPS) {
    const int r = i / M, m = i % M;
    if (row0 + r < N && m < tokens) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; w++) sum += partial[w][r][m];
      out[m * (int64_t)N + row0 + r] = to_16bit(sum, fp16);
    }
  }
}

// out[n, k] = lut[n, code(n, k)] for k < Kp: one warp a row, 16-byte stores in the layout's runs of 8.
template <int BITS>
__global__ void __launch_bounds__(32 * WARPS)
anyprec_dequant_kernel(const uint32_t* __restrict__ qweight, const __half* __restrict__ lut, uint16_t* __restrict__ out,
                       bool fp16, int N, int words, int64_t plane_stride) {
  __shared__ float tables[WARPS][1][1 << BITS];
  const int lane = threadIdx.x, warp = threadIdx.y, row = blockIdx.x * WARPS + warp;
  if (row >= N) return;  // whole warps only: no block-wide barrier below
  float (&table)[1][1 << BITS] = tables[warp];
  stage_tables<BITS, 1>(table, lut, row, N, lane, 32);
  __syncwarp();
  uint16_t* dst = out + (int64_t)row * 32 * words;
  for (int chunk = 0; 32 * chunk < words; chunk++) {
    const int lanes = min(32, words - 32 * chunk);
    if (lane >= lanes) break;  // only the last chunk is partial
    uint32_t q[BITS], codes[8];
    const uint32_t* src = qweight + (int64_t)row * words + 32 * chunk + lane;
#pragma unroll
    for (int j = 0; j < BITS; j++) q[j] = __ldg(src + j * plane_stride);
    bit_transpose<BITS>(q, codes);
#pragma unroll
    for (int L = 0; L < 4; L++) {
      uint32_t pairs[4];
#pragma unroll
      for (int i = 0; i < 4; i++)
        pairs[i] = to_pair(table[0][(codes[2 * i] >> (24 - 8 * L)) & 0xff],
                           table[0][(codes[2 * i + 1] >> (24 - 8 * L)) & 0xff], fp16);
      *reinterpret_cast<uint4*>(dst + 1024 * (int64_t)chunk + L * 8 * lanes + 8 * lane) =
          make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
    }
  }
}

template <int BITS, int M>
void launch_gemv(const void* x, const void* qweight, const void* lut, void* out, bool fp16, int tokens, int N,
                 int words, cudaStream_t stream) {
  // Rows per block: more rows reuse each x load more; registers (ROWS*M accumulators, 8*M activations) bound it.
  constexpr int ROWS = M <= 2 ? 8 : 16 / M;
  anyprec_gemv_kernel<BITS, M, ROWS><<<(N + ROWS - 1) / ROWS, dim3(32, WARPS), 0, stream>>>(
      static_cast<const uint16_t*>(x), static_cast<const uint32_t*>(qweight), static_cast<const __half*>(lut),
      static_cast<uint16_t*>(out), fp16, tokens, N, words, (int64_t)N * words);
}

template <int BITS>
void gemv_bits(const void* x, const void* qweight, const void* lut, void* out, bool fp16, int tokens, int N,
               int words, cudaStream_t stream) {
  if (tokens == 1) launch_gemv<BITS, 1>(x, qweight, lut, out, fp16, tokens, N, words, stream);
  else if (tokens == 2) launch_gemv<BITS, 2>(x, qweight, lut, out, fp16, tokens, N, words, stream);
  else if (tokens <= 4) launch_gemv<BITS, 4>(x, qweight, lut, out, fp16, tokens, N, words, stream);
  else launch_gemv<BITS, 8>(x, qweight, lut, out, fp16, tokens, N, words, stream);
}

template <int BITS>
void dequant_bits(const void* qweight, const void* lut, void* out, bool fp16, int N, int words, cudaStream_t stream) {
  anyprec_dequant_kernel<BITS><<<(N + WARPS - 1) / WARPS, dim3(32, WARPS), 0, stream>>>(
      static_cast<const uint32_t*>(qweight), static_cast<const __half*>(lut), static_cast<uint16_t*>(out), fp16, N,
      words, (int64_t)N * words);
}

#define ANYPREC_DISPATCH(BITS_VALUE, FN, ...) \
  switch (BITS_VALUE) {                        \
    case 3: FN<3>(__VA_ARGS__); break;         \
    case 4: FN<4>(__VA_ARGS__); break;         \
    case 5: FN<5>(__VA_ARGS__); break;         \
    case 6: FN<6>(__VA_ARGS__); break;         \
    case 7: FN<7>(__VA_ARGS__); break;         \
    case 8: FN<8>(__VA_ARGS__); break;         \
    default: return cudaErrorInvalidValue;     \
  }

template <typename T> T* ptr(int64_t address) { return reinterpret_cast<T*>(address); }

}  // namespace

// Entry points take addresses and the stream handle (checked by the Python ops): the source then needs only the
// CUDA toolkit's headers, which keeps its compile check to seconds. They return the launch's cudaError_t.
int gemv(int64_t x, int64_t qweight, int64_t lut, int64_t out, int64_t bits, bool fp16, int64_t tokens, int64_t N,
         int64_t words, int64_t stream) {
  if (tokens < 1 || tokens > 8) return cudaErrorInvalidValue;
  ANYPREC_DISPATCH(bits, gemv_bits, ptr<const void>(x), ptr<const void>(qweight), ptr<const void>(lut), ptr<void>(out),
                   fp16, tokens, N, words, ptr<CUstream_st>(stream));
  return cudaGetLastError();
}

int dequant(int64_t qweight, int64_t lut, int64_t out, int64_t bits, bool fp16, int64_t N, int64_t words,
            int64_t stream) {
  ANYPREC_DISPATCH(bits, dequant_bits, ptr<const void>(qweight), ptr<const void>(lut), ptr<void>(out), fp16, N, words,
                   ptr<CUstream_st>(stream));
  return cudaGetLastError();
}
"""

CPP_DECLARATIONS = """
int gemv(int64_t x, int64_t qweight, int64_t lut, int64_t out, int64_t bits, bool fp16, int64_t tokens, int64_t N,
         int64_t words, int64_t stream);
int dequant(int64_t qweight, int64_t lut, int64_t out, int64_t bits, bool fp16, int64_t N, int64_t words,
            int64_t stream);
"""


@functools.cache
def kernels():
    """The compiled kernels: built on first CUDA use (a minute), then loaded from torch's extension cache."""
    from torch.utils.cpp_extension import load_inline
    return load_inline("anyprec_kernels", CPP_DECLARATIONS, CUDA_SOURCE, functions=["gemv", "dequant"],
                       extra_cuda_cflags=["-O3"])


def _check(qweight: Tensor, lut: Tensor, bits: int, out: Tensor, *wide: Tensor):
    """Shapes, dtypes, one device, contiguity; 16-byte alignment for the `wide` tensors (read or written 16 bytes at
    a time: the GEMV's x, the dequantize kernel's out)."""
    N, words = qweight.shape[1:]
    shapes_ok = (MIN_BITS <= bits <= MAX_BITS and qweight.dtype == torch.int32 and qweight.shape[0] >= bits
                 and lut.dtype == torch.float16 and lut.shape == (N, 2**bits))
    if not shapes_ok:
        raise ValueError(f"anyprec kernels take int32 planes [>= {bits}, N, Kp/32] and an fp16 table [N, 2^{bits}]; "
                         f"got {qweight.dtype} {tuple(qweight.shape)} and {lut.dtype} {tuple(lut.shape)}")
    if not all(t.is_cuda and t.device == qweight.device and t.is_contiguous() for t in (qweight, lut, out, *wide)):
        raise ValueError("anyprec kernels take contiguous tensors on one CUDA device")
    if any(t.data_ptr() % 16 for t in wide):
        raise ValueError("anyprec kernels move activations and weights 16 bytes at a time: align them to 16 bytes")
    if out.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"anyprec kernels write bf16 or fp16, not {out.dtype}")


def gemv_into(x: Tensor, qweight: Tensor, lut: Tensor, bits: int, out: Tensor):
    """out [tokens, N] = x [tokens <= 8, Kp] @ W_bits^T, launched on the current stream."""
    _check(qweight, lut, bits, out, x)
    tokens, N = out.shape
    if tokens == 0:
        return
    if x.dtype != out.dtype or x.shape != (tokens, 32 * qweight.shape[2]) or N != qweight.shape[1] or tokens > 8:
        raise ValueError(f"anyprec gemv: x {tuple(x.shape)} and out {tuple(out.shape)} do not fit planes "
                         f"{tuple(qweight.shape)} (1..8 tokens, x padded to Kp, one dtype)")
    with torch.cuda.device(qweight.device):
        stream = torch.cuda.current_stream().cuda_stream
        error = kernels().gemv(x.data_ptr(), qweight.data_ptr(), lut.data_ptr(), out.data_ptr(), bits,
                               x.dtype == torch.float16, tokens, N, qweight.shape[2], stream)
    if error:
        raise RuntimeError(f"anyprec gemv launch failed with CUDA error {error}")


def dequant_into(qweight: Tensor, lut: Tensor, bits: int, out: Tensor):
    """out [N, Kp] = W_bits, launched on the current stream."""
    _check(qweight, lut, bits, out, out)
    if out.shape != (qweight.shape[1], 32 * qweight.shape[2]):
        raise ValueError(f"anyprec dequant: out {tuple(out.shape)} does not fit planes {tuple(qweight.shape)}")
    with torch.cuda.device(qweight.device):
        error = kernels().dequant(qweight.data_ptr(), lut.data_ptr(), out.data_ptr(), bits, out.dtype == torch.float16,
                                  out.shape[0], qweight.shape[2], torch.cuda.current_stream().cuda_stream)
    if error:
        raise RuntimeError(f"anyprec dequant launch failed with CUDA error {error}")


@torch.library.custom_op("anyprec::gemv", mutates_args=())
def gemv(x: Tensor, qweight: Tensor, lut: Tensor, bits: int) -> Tensor:
    """x [tokens <= 8, K] bf16/fp16 -> x @ W_bits^T [tokens, N], on the bitplanes directly."""
    Kp = 32 * qweight.shape[2]
    x = F.pad(x, (0, Kp - x.shape[1])) if x.shape[1] != Kp else x.contiguous()
    x = x if x.data_ptr() % 16 == 0 else x.clone()  # 16-byte loads of activations
    out = x.new_empty(x.shape[0], qweight.shape[1])
    gemv_into(x, qweight, lut, bits, out)
    return out


@gemv.register_fake
def _(x, qweight, lut, bits):
    return x.new_empty(x.shape[0], qweight.shape[1])


@torch.library.custom_op("anyprec::dequant", mutates_args=())
def dequant(qweight: Tensor, lut: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    """The weight W_bits [N, Kp] in `dtype` (bf16/fp16), for inputs longer than the GEMV takes."""
    out = torch.empty(qweight.shape[1], 32 * qweight.shape[2], dtype=dtype, device=qweight.device)
    dequant_into(qweight, lut, bits, out)
    return out


@dequant.register_fake
def _(qweight, lut, bits, dtype):
    return qweight.new_empty(qweight.shape[1], 32 * qweight.shape[2], dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def main(argv=None):
    from generate import DEFAULT_CHECKPOINT, default_device
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--seed_precision", type=int, default=3, help="width of the k-means seed (3..8)")
    p.add_argument("--parent_precision", type=int, default=8, help="widest width kept (seed..8)")
    p.add_argument("--calibration_file", type=Path, default=None, help="default: the stdlib train split")
    p.add_argument("--calibration_samples", type=int, default=128)
    p.add_argument("--calibration_seq_len", type=int, default=512)
    p.add_argument("--device", default=default_device())
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    path, error = quantize(args.checkpoint_path, args.seed_precision, args.parent_precision, args.calibration_file,
                           args.calibration_samples, args.calibration_seq_len, args.device)
    rows = [("written", str(path)), ("size", f"{path.stat().st_size / 1e6:.1f} MB"),
            ("time", f"{time.perf_counter() - t0:.1f} s")]
    rows += [(f"{p}-bit error", f"{e:.2e} (||W - W_p||^2 / ||W||^2)") for p, e in error.items()]
    print("\n".join(f"{name:>12}: {value}" for name, value in rows))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
