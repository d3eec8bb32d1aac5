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
row apart (bf16's 7 would merge neighbours), and the kernels keep them exactly (bf16 activations meet them as two
bf16 halves, hi + lo).

Runtime: AnyPrecLinear replaces nn.Linear at load (generate.load_model does it for any file with a "quantization"
entry). On CUDA, 1..8 tokens run a bitplane GEMV on tensor cores and longer inputs dequantise then matmul; elsewhere a
gather from the tables computes the same function. The precision is a Python int on each module, so torch.compile
specialises one graph (one CUDA graph) per precision. For self-speculation, `at_precision(model, 3)` gives a
draft that shares every weight with the 8-bit target.

Needs model.py and cli.py; its command line also eval.py (calibration text) and generate.py (loading).
"""
import argparse
import contextlib
import functools
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import cli
from model import DEFAULT_CHECKPOINT, atomic_write, linear, linear_names, load_state, narrow_ranges
MIN_BITS, MAX_BITS = 3, 8  # the kernels' range: below 3 bits quality collapses (the paper leaves 2 out too)
FISHER_FLOOR = 1e-6  # relative to the row's mean Fisher; see quantize_linear
GEMV_MAX_TOKENS = 8  # up to this many tokens a call runs the GEMV kernel; more dequantise the weight first


# ---------------------------------------------------------------------------------------------------------------
# Bitplane layout (version LAYOUT). qweight is int32 [planes, N, Kp/32] (Kp = K rounded up to 128, padded with code
# 0); plane j holds bit (parent-1-j) of every parent code, so the p-bit code is the first p planes and precision p
# reads exactly p/8 of an 8-bit file. Rows are independent. A row's words in one plane come in chunks of 16 words
# (512 weights) and, after the last full chunk, groups of 4 words (128 weights):
#   chunk c, word 4t + i (t, i < 4)    holds  k = 512c + 128i + 32s + 8t + 2f + h   (s, f < 4; h < 2)
#   final group w, word 4w + t         holds  k = 512C + 128w + 32s + 8t + 2f + h   (C = Kp // 512)
# and weight (s, f, h) of a word is its bit (8f + s + 4h + j) mod 32 in plane j.
# Why: the GEMV kernel's lane t of a 4-lane group reads its 4 words of a chunk with one 16-byte load, and they cover
# the weights it feeds to the tensor cores (k-slots 2t, 2t+1 and 2t+8, 2t+9 of an mma are (f, h) pairs), with its
# activations 32s + 8t + 0..7 in one 16-byte load per s. The bit positions let a few instructions turn planes into
# table offsets: for each plane keep its bits of one (s, h) (an AND with a constant) and rotate right by s + 4h, and
# plane j of weight f lands on bit 8f + j, so byte f is the code with its bits reversed (plane 0, the most
# significant, at bit 0); keep both h and rotate by s, and for p <= 4 byte f is the pair (h = 0) | (h = 1) << 4. Each
# is exact: for a fixed plane, (8f + s + 4h) over all (s, f, h) is every bit position 0..31 once.
# Tensor parallelism: column-parallel slices rows (dim 1 of qweight, dim 0 of the tables); row-parallel must
# unpack, slice K and pack again (the chunks do not survive a cut at, say, 11008/2).
LAYOUT = 2  # the file's "layout" entry; 1 was the 1024-weight-chunk layout of the first kernels (no file was published)


def padded(in_features: int) -> int:
    return -(-in_features // 128) * 128


def _bit_positions(plane: int, device) -> Tensor:
    """[s, f, h] -> the bit of weight (s, f, h) in a word of `plane`."""
    s, f, h = torch.arange(4, device=device), torch.arange(4, device=device), torch.arange(2, device=device)
    return (8 * f[None, :, None] + s[:, None, None] + 4 * h[None, None, :] + plane) % 32


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [N, K] of `bits` bits -> int32 bitplanes [bits, N, Kp/32], most significant plane first."""
    N, K = codes.shape
    Kp = padded(K)
    codes = F.pad(codes.to(torch.int64), (0, Kp - K))
    full, groups = Kp // 512, Kp % 512 // 128
    planes = []
    for j in range(bits):
        bit = (codes >> (bits - 1 - j)) & 1
        at = _bit_positions(j, codes.device)
        head = bit[:, : 512 * full].reshape(N, full, 4, 4, 4, 4, 2) << at[:, None, :, :]  # [N, c, i, s, t, f, h]
        words = [head.sum((3, 5, 6)).transpose(2, 3).flatten(1)]  # [N, c, t, i]: lane t's 4 words side by side
        end = bit[:, 512 * full:].reshape(N, groups, 4, 4, 4, 2) << at[:, None, :, :]  # [N, w, s, t, f, h]
        words.append(end.sum((2, 4, 5)).flatten(1))  # [N, w, t]
        words = torch.cat(words, dim=1)
        planes.append(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))  # uint32 bits in int32
    return torch.stack(planes)


def unpack(qweight: Tensor, bits: int, in_features: int = None) -> Tensor:
    """int32 bitplanes [planes, N, Kp/32] -> uint8 codes [N, in_features or Kp] at precision `bits` (top planes)."""
    _, N, words = qweight.shape
    full, groups = words // 16, words % 16 // 4
    codes = torch.zeros(N, 32 * words, dtype=torch.uint8, device=qweight.device)
    for j in range(bits):
        w = qweight[j].to(torch.int64) & 0xFFFFFFFF
        at = _bit_positions(j, qweight.device)
        head = w[:, : 16 * full].reshape(N, full, 4, 4).transpose(2, 3)  # [N, c, i, t]
        head = head[:, :, :, None, :, None, None] >> at[:, None, :, :]  # [N, c, i, s, t, f, h]
        end = w[:, 16 * full:].reshape(N, groups, 1, 4, 1, 1) >> at[:, None, :, :]  # [N, w, s, t, f, h]
        bit = torch.cat([head.flatten(1), end.flatten(1)], dim=1) & 1
        codes |= (bit << (bits - 1 - j)).to(torch.uint8)
    return codes[:, :in_features] if in_features else codes


def dequantize(qweight: Tensor, lut: Tensor, bits: int, in_features: int = None) -> Tensor:
    """The weight [N, K] at precision `bits`, in the tables' dtype: what every kernel must compute with."""
    return lut.gather(1, unpack(qweight, bits, in_features).long())


# ---------------------------------------------------------------------------------------------------------------
# Quantization: sensitivity, seed k-means, incremental upscaling. Vectorised over rows; every row is sorted once
# and all segment statistics come from float64 prefix sums, so a cluster's mean or a split's cost is O(1).

def fisher_diag(model: nn.Module, windows: Tensor, progress=True) -> dict:
    """Diagonal empirical Fisher of every quantized Linear: sum over sequences of (dLoss/dW)^2, one sequence per
    backward (the square of a sequence's gradient, not of each token's), accumulated in fp32. The block Linears are
    quantized; the output head stays as it is."""
    targets = {name: model.get_submodule(name).weight for name in linear_names(model, include_output=False)}
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

    Starts as upstream does, greedy k-means++ (kmeans_plus_plus), then Lloyd, and re-cutting every pair of
    neighbouring clusters at the best cut of their union (a move Lloyd's midpoints cannot make), in turn until
    neither moves a border. Returns borders [R, k+1] (cluster c is the sorted segment [borders[c], borders[c+1]))
    and sorted centroids [R, k]."""
    R, K = ws.shape
    P0, P1 = _prefix(s), _prefix(s * ws)
    centres = kmeans_plus_plus(ws, s, 2**bits)
    borders = torch.cat([torch.zeros_like(centres[:, :1], dtype=torch.int64),
                         torch.searchsorted(ws, (centres[:, 1:] + centres[:, :-1]) / 2),
                         torch.full_like(centres[:, :1], K, dtype=torch.int64)], dim=1)
    centroids = _segment_means(P0, P1, borders, centres)
    rows = torch.arange(R, device=ws.device)  # the rows still moving
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


def kmeans_plus_plus(ws: Tensor, s: Tensor, k: int) -> Tensor:
    """k sorted starting centres [R, k] per row of sorted ws [R, K]: each new centre is the best of 2 + ln k
    candidates drawn in proportion to s * D^2, by the weighted SSE it removes (scored in O(log K) from prefix sums).
    Deterministic: a seeded generator."""
    K, device = ws.shape[1], ws.device
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
    return centres


def quantize_linear(weight: Tensor, fisher: Tensor, seed_bits: int = 3, parent_bits: int = 8,
                    rows_per_chunk: int = None, iters: int = 50):
    """weight, fisher [N, K] -> (parent codes uint8 [N, K], {p: fp16 table [N, 2^p]} for p = seed..parent bits)."""
    N, K = weight.shape
    rows_per_chunk = rows_per_chunk or max(1, 2**24 // K)
    codes, luts = [], {p: [] for p in range(seed_bits, parent_bits + 1)}
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
        borders, centroids = kmeans_rows(ws, s, seed_bits, iters)
        luts[seed_bits].append(centroids.half())
        P0, P1 = _prefix(s), _prefix(s * ws)
        for p in range(seed_bits + 1, parent_bits + 1):  # upscaling: cluster c of p-1 bits becomes 2c and 2c+1 of p bits
            borders = best_cuts(ws, s, borders)
            centroids = _segment_means(P0, P1, borders, centroids.repeat_interleave(2, dim=1))
            luts[p].append(centroids.half())
        sorted_codes = _segment_of(borders, K)
        codes.append(torch.empty_like(sorted_codes).scatter_(1, order, sorted_codes).to(torch.uint8))
    return torch.cat(codes), {p: torch.cat(t) for p, t in luts.items()}


def check_widths(seed_bits: int, parent_bits: int):
    if not MIN_BITS <= seed_bits <= parent_bits <= MAX_BITS:
        raise ValueError(f"need {MIN_BITS} <= --seed_precision <= --parent_precision <= {MAX_BITS}, "
                         f"got {seed_bits} and {parent_bits}")


def quantize_state(state: dict, fisher: dict, seed_bits: int = 3, parent_bits: int = 8, device="cpu",
                   progress=True, iters: int = 50):
    """A bf16 state dict -> the any-precision state dict (block Linears as qweight + lut{p}), and the relative
    squared error ||W - W_p||^2 / ||W||^2 of the quantized weights at each width. iters=0 stops the k-means at
    its seeding: a rough model in seconds, for timing."""
    check_widths(seed_bits, parent_bits)
    out, error, total = dict(state), {p: 0.0 for p in range(seed_bits, parent_bits + 1)}, 0.0
    for name in tqdm(sorted(fisher), desc="anyprec", disable=not progress):
        weight = state[f"{name}.weight"].to(device, torch.float32)
        codes, luts = quantize_linear(weight, fisher[name].to(device), seed_bits, parent_bits, iters=iters)
        del out[f"{name}.weight"]
        out[f"{name}.qweight"] = pack(codes, parent_bits).cpu()
        for p, lut in luts.items():
            out[f"{name}.lut{p}"] = lut.cpu()
            error[p] += (lut.float().gather(1, (codes >> (parent_bits - p)).long()) - weight).square().sum().item()
        total += weight.square().sum().item()
    out["quantization"] = {"mode": "anyprec", "seed_precision": seed_bits, "parent_precision": parent_bits,
                           "layout": LAYOUT}
    return out, {p: e / total for p, e in error.items()}


def output_path(checkpoint_path: Path, seed_bits: int, parent_bits: int) -> Path:
    """Beside the original, named as quantize.py names its files: model_anyprec.3-8.pth."""
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_anyprec.{seed_bits}-{parent_bits}.pth")


def quantize(checkpoint_path, fisher: dict, seed_bits: int = 3, parent_bits: int = 8, device="cpu",
             progress=True) -> tuple[Path, dict]:
    """Quantize the unquantized checkpoint with the Fisher information of its block Linears (fisher_diag) and write
    the any-precision file beside it. Returns (its path, relative error per width)."""
    path = Path(checkpoint_path)
    out, error = quantize_state(load_state(path, unquantized=True), fisher, seed_bits, parent_bits, device, progress)
    target = output_path(path, seed_bits, parent_bits)
    with atomic_write(target) as f:  # a file object: the archive's inner name is then fixed, and the bytes reproducible
        torch.save(out, f)
    return target, error


# ---------------------------------------------------------------------------------------------------------------
# Runtime.

class AnyPrecLinear(nn.Module):
    """y = x W_p^T with W_p[n, k] = lut{p}[n, code_p[n, k]]: the p-bit code is the top p of the stored planes."""

    def __init__(self, in_features: int, out_features: int, precisions, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.precisions = tuple(sorted(precisions))
        self._precision = max(self.precisions)  # a Python int: compiled graphs specialise on it
        planes = max(self.precisions)
        self.register_buffer("qweight", torch.empty(planes, out_features, padded(in_features) // 32,
                                                    dtype=torch.int32, device=device))
        for p in self.precisions:
            self.register_buffer(f"lut{p}", torch.empty(out_features, 2**p, dtype=torch.float16, device=device))
        self.register_buffer("dense", None, persistent=False)

    @property
    def precision(self) -> int:
        return self._precision

    @precision.setter
    def precision(self, p: int):  # the switch: on CPU it dequantises again, once
        if p != self._precision:
            self._precision = p
            self.prepare()

    def prepare(self):
        """On CPU, W_p at the current precision dequantised once, in CPU_DTYPE: a matmul that reads it runs at the
        speed of the bf16 model's (2 bytes a weight beside the planes, where gathering from the tables on every call
        ran several times slower). Rebuilt when the precision changes, the module moves or is sharded."""
        on_cpu = CPU_KERNELS and self.qweight.device.type == "cpu" and KERNEL_DEVICE != "cpu"
        p = self.precision
        self.dense = dequantize(self.qweight, getattr(self, f"lut{p}"), p, self.in_features).to(CPU_DTYPE) if on_cpu \
            else None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.prepare()

    def _apply(self, fn, recurse=True):
        files = {k: v for k, v in self._buffers.items() if k not in self._non_persistent_buffers_set}
        module = super()._apply(fn, recurse)
        if any(self._buffers[k] is not v for k, v in files.items()):  # moved or cast: a no-op .to() rebuilds nothing
            self.prepare()
        return module

    def forward(self, x: Tensor, precision: int = None) -> Tensor:
        p = self.precision if precision is None else precision
        lut = getattr(self, f"lut{p}")
        if x.device.type == KERNEL_DEVICE:
            x2 = x.reshape(-1, self.in_features)  # [tokens, K]
            if x2.shape[0] <= GEMV_MAX_TOKENS and x.dtype in (torch.bfloat16, torch.float16):
                y = torch.ops.anyprec.gemv(x2, self.qweight, lut, p)
            else:
                # The tables are fp16, so W_p dequantised to fp16 is exact: fp32 activations keep fp32 semantics for
                # one dequantise kernel a call (unpacking every plane in PyTorch took dozens of passes over them).
                dtype = x.dtype if x.dtype == torch.bfloat16 else torch.float16
                w = torch.ops.anyprec.dequant(self.qweight, lut, p, dtype)  # [N, Kp]
                y = F.linear(F.pad(x2, (0, w.shape[1] - self.in_features)), w.to(x.dtype))
            return y.reshape(*x.shape[:-1], self.out_features)
        if CPU_KERNELS and self.dense is not None and p == self.precision:
            return linear(x.to(self.dense.dtype), self.dense).to(x.dtype)
        return F.linear(x, dequantize(self.qweight, lut, p, self.in_features).to(x.dtype))

    def shard(self, dim: int, ranges: list[tuple[int, int]]):
        """Keep `ranges` of the outputs (dim 0: rows of the planes and tables) or of the inputs (dim 1). The planes
        interleave a row's bits in 1024-weight chunks, which a cut through K (say at 11008/2) does not respect: the
        codes are unpacked, sliced and packed again, a block of rows at a time to bound the unpacked copy."""
        if dim == 0:
            self.qweight = narrow_ranges(self.qweight, 1, ranges)
            for p in self.precisions:
                setattr(self, f"lut{p}", narrow_ranges(getattr(self, f"lut{p}"), 0, ranges))
            self.out_features = self.qweight.shape[1]
        else:
            planes, rows = self.qweight.shape[0], 1024
            blocks = [narrow_ranges(unpack(self.qweight[:, r:r + rows], planes, self.in_features), 1, ranges)
                      for r in range(0, self.qweight.shape[1], rows)]
            self.qweight = torch.cat([pack(codes, planes) for codes in blocks], dim=1)
            self.in_features = sum(n for _, n in ranges)
        self.prepare()

    input_multiple = 1  # a row-parallel shard may cut the inputs anywhere (it is repacked)

    def bytes_read(self) -> int:
        """What one call reads of the weight at the current precision: p of the planes and the p-bit table (on CPU,
        the dequantised weight)."""
        if self.dense is not None:
            return self.dense.numel() * self.dense.element_size()
        p, (_, N, words) = self.precision, self.qweight.shape
        return p * N * words * 4 + N * 2**p * 2

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, precision={self.precision}, loaded={list(self.precisions)}"


def file_precisions(quantization: dict) -> list:
    """The widths a file holds, from its "quantization" entry (checked: a damaged entry must not load)."""
    seed_bits, parent_bits = quantization.get("seed_precision"), quantization.get("parent_precision")
    if not (type(seed_bits) is int and type(parent_bits) is int and MIN_BITS <= seed_bits <= parent_bits <= MAX_BITS):
        raise ValueError(f"the file's any-precision entry {quantization} needs seed_precision <= parent_precision in "
                         f"{MIN_BITS}..{MAX_BITS}: the file is damaged")
    if quantization.get("layout", LAYOUT) != LAYOUT:
        raise ValueError(f"this any-precision file has bitplane layout {quantization['layout']} and these kernels read "
                         f"layout {LAYOUT}: re-quantize with python anyprec.py --checkpoint_path <the bf16 model.pth>")
    return list(range(seed_bits, parent_bits + 1))


def swap_linears(model: nn.Module, quantization: dict):
    """Replace the block Linears by AnyPrecLinear (on the Linears' device, meta at load) for the widths loaded."""
    precisions = quantization.get("precisions", file_precisions(quantization))
    for name in linear_names(model, include_output=False):
        linear = model.get_submodule(name)
        model.set_submodule(name, AnyPrecLinear(linear.in_features, linear.out_features, precisions,
                                                linear.weight.device))


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
    view = model.twin()
    set_precision(view, precision)
    return view


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels, built with load_inline on first use. Both read the layout above; the GEMV multiplies on tensor cores
# with exact products and fp32 sums, the dequantize kernel converts exactly; both launch on the current stream (so
# CUDA graphs capture them) and check every bound. scripts/kernel_report.py reads their machine code (README has the
# figures).

CUDA_SOURCE = r"""
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

namespace {

constexpr int WARPS = 8;  // per block: they share the block's rows and take turns over K's 512-weight chunks

// ---- Tables. Lane (g, t) = 4 g + t of a warp reads a weight's entry at  region + 256 v + 128 slot + 32 t + 4 g:  v is
// the weight's code byte (from the planes, below), slot picks the lane's row (g or g + 8 of a 16-row tile). Within
// every 256-byte stripe lane (g, t) owns bank 8 t + g, its own copy of its rows' entries (the four lanes t of a row
// each have one), so the 32 lanes of a lookup hit 32 banks whatever their codes. One PRMT builds the address: v into
// byte 1, 32 t + 4 g (< 128) into byte 0. An entry is an A-fragment register of mma.sync.m16n8k16 (two 16-bit values,
// the lower k-slot in the low half):
// - 3 bits, pairs: v = va | vb << 4 holds the codes of one row's weights h = 0 and 1, at k-slots 2t and 2t + 1, and the
//   entry is {W[a], W[b]}. fp16: one table. bf16: two, hi = bf16(W) and lo = bf16(W - hi); fp16's 11 significant
//   bits are bf16's 8 and at most 3 more, so lo is exact and hi + lo = W. The tensor cores multiply 8-bit by 8-bit
//   significands exactly and sum in fp32: the products are those of W itself.
// - 4..8 bits, single codes: v = the code, entry {hi, lo} (bf16) or {W, W} (fp16), in a k-slot pair whose activations
//   are {x, x} (hi x + lo x = W x) or {x, 0} (W x + W 0 = W x). One lookup a weight, no repacking.
template <int BITS, bool FP16, int TILES>
struct Tables {
  static constexpr bool PAIRS = BITS == 3;
  static_assert(!PAIRS || TILES == 1, "pair tables serve one 16-row tile");
  static constexpr int STRIPES = PAIRS ? 0x78 : 1 << BITS;  // the byte values v takes (pairs: va, vb < 8)
  static constexpr int REGION = 256 * STRIPES;
  static constexpr int REGIONS = PAIRS ? (FP16 ? 1 : 2) : TILES;  // pairs: hi (and lo); single codes: one per tile
  static constexpr int SUMS = WARPS * TILES * 16 * 8 * 4;        // the warps' partial sums, in the same memory after
  static constexpr int BYTES = REGIONS * REGION > SUMS ? REGIONS * REGION : SUMS;
};

// ---- Bits (the layout comment in Python says why each is exact).
__host__ __device__ constexpr uint32_t rotl(uint32_t v, int r) { return r % 32 ? v << r % 32 | v >> (32 - r % 32) : v; }
__device__ __forceinline__ uint32_t rotr(uint32_t v, int r) { return rotl(v, 32 - r % 32); }

// Byte f = code of weight (s, f, h), bits reversed (plane j at bit j): each plane's bits of (s, h), rotated into place.
template <int BITS>
__device__ __forceinline__ uint32_t code_bytes(const uint32_t (&q)[BITS], int s, int h) {
  uint32_t v = 0;
#pragma unroll
  for (int j = 0; j < BITS; j++) v |= q[j] & rotl(0x01010101u << j, s + 4 * h);
  return rotr(v, s + 4 * h);
}

// Byte f = v(s, f, 0) | v(s, f, 1) << 4, for BITS <= 4: both h at once.
template <int BITS>
__device__ __forceinline__ uint32_t code_pairs(const uint32_t (&q)[BITS], int s) {
  static_assert(BITS <= 4, "two codes a byte");
  uint32_t v = 0;
#pragma unroll
  for (int j = 0; j < BITS; j++) v |= q[j] & rotl(0x11111111u << j, s);
  return rotr(v, s);
}

// The table offset of byte f of v for this lane: [32 t + 4 g, v byte f, 0, 0].
__device__ __forceinline__ uint32_t entry(uint32_t v, int f, uint32_t lane_offset) {
  return __byte_perm(v, lane_offset, 0x5504 | f << 4);
}
__device__ __forceinline__ uint32_t lookup(const char* tables, uint32_t offset) {
  return *reinterpret_cast<const uint32_t*>(tables + offset);
}
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// ---- The PTX instructions, each behind a device function; tests/cuda_emu runs the same operations on the CPU.

// Weights are read exactly once: keep them out of L1, which then holds the activations every block re-reads.
__device__ __forceinline__ uint4 load_weights(const uint32_t* p) {
#if defined(__CUDA_ARCH__)
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
#else
  return __ldg(reinterpret_cast<const uint4*>(p));
#endif
}

// D += A B on one warp's fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"); lane =
// 4 g + t: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9];
// b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]; d[0, 1] = D[g][2t, 2t+1], d[2, 3] = D[g+8][2t, 2t+1].
template <bool FP16>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
  if constexpr (FP16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(CUDA_EMU)
  emu_mma_m16n8k16<std::conditional_t<FP16, __half, __nv_bfloat16>>(d, a, b, d);
#endif
}

template <bool FP16>
__device__ __forceinline__ uint16_t to_16bit(float v) {
  return FP16 ? __half_as_ushort(__float2half_rn(v)) : __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// A table entry from the fp16 table values (as bits): {a, b} for fp16, {hi(a), hi(b)} or {lo(a), lo(b)} for bf16.
template <bool FP16, bool LO = false>
__device__ __forceinline__ uint32_t entry_of(uint16_t a, uint16_t b) {
  if constexpr (FP16) return a | uint32_t(b) << 16;
  const float fa = __half2float(__ushort_as_half(a)), fb = __half2float(__ushort_as_half(b));
  const __nv_bfloat16 ha = __float2bfloat16_rn(fa), hb = __float2bfloat16_rn(fb);
  if constexpr (!LO) return __bfloat16_as_ushort(ha) | uint32_t(__bfloat16_as_ushort(hb)) << 16;
  return __bfloat16_as_ushort(__float2bfloat16_rn(fa - __bfloat162float(ha))) |  // exact: see Tables
         uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(fb - __bfloat162float(hb)))) << 16;
}

// Every lane's copies of the block's table entries. Items are (4 rows g..g+3 of one slot, v): one 16-byte store a
// lane t covers the four rows. The loops' trip counts are the same for every thread (small tables are written more
// than once, with the same values): ptxas then keeps the tables' base in a uniform register.
template <int BITS, bool FP16, int TILES>
__device__ __forceinline__ void build_tables(char* tables, const uint16_t* __restrict__ lut, int row0, int N) {
  using T = Tables<BITS, FP16, TILES>;
  constexpr int CODES = 1 << BITS, ITEMS = 4 * TILES * (T::PAIRS ? 64 : CODES);
#pragma unroll
  for (int base = 0; base < ITEMS; base += 32 * WARPS) {
    constexpr int PER_QUAD = ITEMS / (4 * TILES);
    const int item = (base + threadIdx.x) % ITEMS, quad = item / PER_QUAD, index = item % PER_QUAD;
    const int tile = quad / 4, slot = quad / 2 % 2, row = row0 + 4 * quad;  // rows 16 tile + 8 slot + 4 (quad % 2) + e
    // v -> codes: v holds a code's bits reversed (pairs: two 3-bit codes in its nibbles)
    const int v = T::PAIRS ? (index % 8) | (index / 8) << 4 : index;
    const int a = __brev(T::PAIRS ? v & 7 : v) >> (32 - (T::PAIRS ? 3 : BITS)), b = __brev(v >> 4) >> 29;
    uint32_t hi[4], lo[4];
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const uint16_t* w = lut + (int64_t)min(row + e, N - 1) * CODES;  // rows past N: any table, never written out
      if constexpr (T::PAIRS) {
        hi[e] = entry_of<FP16>(w[a], w[b]);
        lo[e] = entry_of<FP16, true>(w[a], w[b]);
      } else {
        hi[e] = entry_of<FP16>(w[a], w[a]);
        lo[e] = entry_of<FP16, true>(w[a], w[a]);
        if constexpr (!FP16) hi[e] = (hi[e] & 0xffffu) | lo[e] << 16;  // {hi, lo}
      }
    }
    char* stripe = tables + (T::PAIRS ? 0 : tile * T::REGION) + 256 * v + 128 * slot + 16 * (quad % 2);
#pragma unroll
    for (int t = 0; t < 4; t++) {
      *reinterpret_cast<uint4*>(stripe + 32 * t) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
      if constexpr (T::PAIRS && !FP16)
        *reinterpret_cast<uint4*>(stripe + T::REGION + 32 * t) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
    }
  }
}

// One 128-weight group of K for the warp's 16 * TILES rows: lane (g, t) has, for each of its rows g + 8 slot, the BITS
// plane words covering k = k0 + 32 s + 8 t + 2 f + h, and at xs + 32 s its token's activations k0 + 32 s + 8 t + 0..7.
template <int BITS, bool FP16, int TILES>
__device__ __forceinline__ void multiply_group(float (&acc)[TILES][4], const uint32_t (&q)[2 * TILES][BITS],
                                               const uint16_t* xs, const char* tables, uint32_t lane_offset) {
  using T = Tables<BITS, FP16, TILES>;
#pragma unroll
  for (int s = 0; s < 4; s++) {
    const uint4 x4 = __ldg(reinterpret_cast<const uint4*>(xs + 32 * s));
    const uint32_t x[4] = {x4.x, x4.y, x4.z, x4.w};  // x[f]: activations (f, h = 0) low, (f, h = 1) high
    if constexpr (T::PAIRS) {
      // Two mmas of 16 k-slots: slots 2t, 2t+1 are weights (f = 2m, h = 0, 1), slots 2t+8, 2t+9 are (2m + 1, h).
      const uint32_t v[2] = {code_pairs<3>(q[0], s), code_pairs<3>(q[1], s)};  // rows g, g + 8
#pragma unroll
      for (int m = 0; m < 2; m++) {
        const uint32_t b[2] = {x[2 * m], x[2 * m + 1]};
        uint32_t offset[4], a[4];
#pragma unroll
        for (int r = 0; r < 4; r++) offset[r] = entry(v[r % 2], 2 * m + r / 2, lane_offset) + 128 * (r % 2);
#pragma unroll
        for (int r = 0; r < 4; r++) a[r] = lookup(tables, offset[r]);
        mma<FP16>(acc[0], a, b);
        if constexpr (!FP16) {
#pragma unroll
          for (int r = 0; r < 4; r++) a[r] = lookup(tables, offset[r] + T::REGION);
          mma<FP16>(acc[0], a, b);
        }
      }
    } else {
      // One mma per f: k-slots 2t, 2t+1 are weight (f, 0) as {hi, lo} or {W, W}, slots 2t+8, 2t+9 weight (f, 1).
      uint32_t b[4][2];
#pragma unroll
      for (int f = 0; f < 4; f++) {
        b[f][0] = FP16 ? x[f] & 0xffffu : __byte_perm(x[f], 0, 0x1010);  // {x, 0} or {x, x}
        b[f][1] = FP16 ? x[f] >> 16 : __byte_perm(x[f], 0, 0x3232);
      }
#pragma unroll
      for (int tile = 0; tile < TILES; tile++) {
        uint32_t v[2][2];  // [slot][h]
#pragma unroll
        for (int slot = 0; slot < 2; slot++) {
          if constexpr (BITS == 4) {  // one merge for both h: the nibbles of code_pairs
            const uint32_t both = code_pairs<4>(q[2 * tile + slot], s);
            v[slot][0] = both & 0x0f0f0f0fu, v[slot][1] = both >> 4 & 0x0f0f0f0fu;
          } else {
            v[slot][0] = code_bytes<BITS>(q[2 * tile + slot], s, 0);
            v[slot][1] = code_bytes<BITS>(q[2 * tile + slot], s, 1);
          }
        }
        const uint32_t region = tile * T::REGION;
#pragma unroll
        for (int f = 0; f < 4; f++) {
          const uint32_t a[4] = {lookup(tables, entry(v[0][0], f, lane_offset) + region),
                                 lookup(tables, entry(v[1][0], f, lane_offset) + region + 128),
                                 lookup(tables, entry(v[0][1], f, lane_offset) + region),
                                 lookup(tables, entry(v[1][1], f, lane_offset) + region + 128)};
          mma<FP16>(acc[tile], a, b[f]);
        }
      }
    }
  }
}

// out[m, n] = sum_k x[m, k] * lut[n, code(n, k)] for m < tokens <= 8, by tensor cores: a warp's mma tiles are 16 rows
// (TILES of them) by the 8 tokens, lane (g, t) feeding rows g, g + 8 (+ 16 per tile) and token g (tokens past the
// last repeat it, unwritten). A block owns the tiles' rows; its warps take K's chunks in turn, each lane loading a
// chunk's BITS planes of every row it feeds (16 bytes each, all before any is used), then sum through shared memory.
template <int BITS, bool FP16, int TILES>
__global__ void __launch_bounds__(32 * WARPS, 2)
anyprec_gemv_kernel(const uint16_t* __restrict__ x, const uint32_t* __restrict__ qweight,
                    const uint16_t* __restrict__ lut, uint16_t* __restrict__ out, int tokens, int N, int words,
                    int64_t plane_stride) {
  using T = Tables<BITS, FP16, TILES>;
  constexpr int SLOTS = 2 * TILES;
  extern __shared__ uint4 shared[];  // T::BYTES: the tables, then the warps' sums
  char* tables = reinterpret_cast<char*>(shared);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int row0 = blockIdx.x * 16 * TILES, chunks = words / 16, groups = words % 16 / 4;
  const int64_t Kp = 32 * (int64_t)words;
  const uint32_t* rows[SLOTS];  // row g + 8 slot (past N: row N - 1, read but never written)
#pragma unroll
  for (int slot = 0; slot < SLOTS; slot++) rows[slot] = qweight + (int64_t)min(row0 + g + 8 * slot, N - 1) * words;
  const uint16_t* xs = x + min(g, tokens - 1) * Kp + 8 * t;
  const uint32_t lane_offset = 32 * t + 4 * g;

  // The first chunk's planes are in flight while the block builds its tables.
  uint4 q[SLOTS][BITS];
  int chunk = warp;
  if (chunk < chunks) {
#pragma unroll
    for (int slot = 0; slot < SLOTS; slot++)
#pragma unroll
      for (int j = 0; j < BITS; j++) q[slot][j] = load_weights(rows[slot] + j * plane_stride + 16 * chunk + 4 * t);
  }
  build_tables<BITS, FP16, TILES>(tables, lut, row0, N);
  __syncthreads();

  float acc[TILES][4] = {};
  while (chunk < chunks) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      uint32_t w[SLOTS][BITS];
#pragma unroll
      for (int slot = 0; slot < SLOTS; slot++)
#pragma unroll
        for (int j = 0; j < BITS; j++) w[slot][j] = word(q[slot][j], i);
      multiply_group<BITS, FP16, TILES>(acc, w, xs + 512 * chunk + 128 * i, tables, lane_offset);
    }
    chunk += WARPS;
    if (chunk < chunks) {  // the next chunk's loads, unconditional in the loop's body
#pragma unroll
      for (int slot = 0; slot < SLOTS; slot++)
#pragma unroll
        for (int j = 0; j < BITS; j++) q[slot][j] = load_weights(rows[slot] + j * plane_stride + 16 * chunk + 4 * t);
    }
  }
  // K's last Kp mod 512 weights: 128-weight groups of one 4-byte word a lane and plane, for the last warps.
  for (int group = WARPS - 1 - warp; group < groups; group += WARPS) {
    uint32_t w[SLOTS][BITS];
#pragma unroll
    for (int slot = 0; slot < SLOTS; slot++)
#pragma unroll
      for (int j = 0; j < BITS; j++) w[slot][j] = __ldg(rows[slot] + j * plane_stride + 16 * chunks + 4 * group + t);
    multiply_group<BITS, FP16, TILES>(acc, w, xs + 512 * chunks + 128 * group, tables, lane_offset);
  }

  __syncthreads();  // the tables are done with: their memory takes the sums [warp][16 TILES rows][8 tokens]
  float* sums = reinterpret_cast<float*>(shared);
#pragma unroll
  for (int tile = 0; tile < TILES; tile++)
#pragma unroll
    for (int c = 0; c < 4; c++)
      sums[(warp * 16 * TILES + 16 * tile + g + 8 * (c / 2)) * 8 + 2 * t + c % 2] = acc[tile][c];
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * TILES * 8; i += 32 * WARPS) {
    const int r = i / 8, m = i % 8;
    if (row0 + r < N && m < tokens) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; w++) sum += sums[(w * 16 * TILES + r) * 8 + m];
      out[m * (int64_t)N + row0 + r] = to_16bit<FP16>(sum);
    }
  }
}

// out[n, k] = lut[n, code(n, k)] for k < Kp: one warp a row, lane l decoding words l, l + 32, ... (32 weights each)
// as the GEMV does, then writing them as four runs of 8 (16-byte stores).
template <int BITS, bool FP16>
__global__ void __launch_bounds__(32 * WARPS)
anyprec_dequant_kernel(const uint32_t* __restrict__ qweight, const uint16_t* __restrict__ lut,
                       uint16_t* __restrict__ out, int N, int words, int64_t plane_stride) {
  __shared__ uint16_t tables[WARPS][1 << BITS];  // a warp's row in the output dtype, by v (the code's bits reversed)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, row = blockIdx.x * WARPS + warp;
  if (row >= N) return;  // whole warps: no block-wide barrier below
  uint16_t* table = tables[warp];
  for (int v = lane; v < (1 << BITS); v += 32) {
    const uint16_t w = lut[(int64_t)row * (1 << BITS) + (__brev(v) >> (32 - BITS))];
    table[v] = FP16 ? w : to_16bit<false>(__half2float(__ushort_as_half(w)));
  }
  __syncwarp();
  const int chunks = words / 16;
  uint16_t* dst = out + (int64_t)row * 32 * words;
  for (int w = lane; w < words; w += 32) {
    // word w covers k0 + 32 s + 2 f + h: in a chunk it is word i = w % 4 of lane t = w % 16 / 4, after the chunks
    // group (w - 16 chunks) / 4's word of lane t = w % 4
    const int k0 = w < 16 * chunks ? 512 * (w / 16) + 128 * (w % 4) + 8 * (w % 16 / 4)
                                   : 512 * chunks + 128 * ((w - 16 * chunks) / 4) + 8 * (w % 4);
    uint32_t q[BITS];
#pragma unroll
    for (int j = 0; j < BITS; j++) q[j] = __ldg(qweight + j * plane_stride + (int64_t)row * words + w);
#pragma unroll
    for (int s = 0; s < 4; s++) {
      const uint32_t v0 = code_bytes<BITS>(q, s, 0), v1 = code_bytes<BITS>(q, s, 1);
      uint32_t pairs[4];
#pragma unroll
      for (int f = 0; f < 4; f++) pairs[f] = table[v0 >> 8 * f & 0xff] | uint32_t(table[v1 >> 8 * f & 0xff]) << 16;
      *reinterpret_cast<uint4*>(dst + k0 + 32 * s) = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
    }
  }
}

// Rows a block's warps share: 16, or 32 at 4 bits (two tiles share each activation load; their tables are small).
template <int BITS> constexpr int tiles() { return BITS == 4 ? 2 : 1; }

template <int BITS, bool FP16>
cudaError_t launch_gemv(const void* x, const void* qweight, const void* lut, void* out, int tokens, int N, int words,
                        cudaStream_t stream) {
  constexpr int TILES = tiles<BITS>(), BYTES = Tables<BITS, FP16, TILES>::BYTES;
  const auto kernel = anyprec_gemv_kernel<BITS, FP16, TILES>;
  if (BYTES > 48 * 1024)
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, BYTES)) return e;
  kernel<<<(N + 16 * TILES - 1) / (16 * TILES), 32 * WARPS, BYTES, stream>>>(
      static_cast<const uint16_t*>(x), static_cast<const uint32_t*>(qweight), static_cast<const uint16_t*>(lut),
      static_cast<uint16_t*>(out), tokens, N, words, (int64_t)N * words);
  return cudaSuccess;
}

template <int BITS>
cudaError_t gemv_bits(const void* x, const void* qweight, const void* lut, void* out, bool fp16, int tokens, int N,
                      int words, cudaStream_t stream) {
  return fp16 ? launch_gemv<BITS, true>(x, qweight, lut, out, tokens, N, words, stream)
              : launch_gemv<BITS, false>(x, qweight, lut, out, tokens, N, words, stream);
}

template <int BITS>
cudaError_t dequant_bits(const void* qweight, const void* lut, void* out, bool fp16, int N, int words,
                         cudaStream_t stream) {
  const auto kernel = fp16 ? anyprec_dequant_kernel<BITS, true> : anyprec_dequant_kernel<BITS, false>;
  kernel<<<(N + WARPS - 1) / WARPS, 32 * WARPS, 0, stream>>>(static_cast<const uint32_t*>(qweight),
                                                            static_cast<const uint16_t*>(lut),
                                                            static_cast<uint16_t*>(out), N, words, (int64_t)N * words);
  return cudaSuccess;
}

#define ANYPREC_DISPATCH(BITS_VALUE, FN, ...)  \
  switch (BITS_VALUE) {                        \
    case 3: error = FN<3>(__VA_ARGS__); break; \
    case 4: error = FN<4>(__VA_ARGS__); break; \
    case 5: error = FN<5>(__VA_ARGS__); break; \
    case 6: error = FN<6>(__VA_ARGS__); break; \
    case 7: error = FN<7>(__VA_ARGS__); break; \
    case 8: error = FN<8>(__VA_ARGS__); break; \
    default: return cudaErrorInvalidValue;     \
  }

template <typename T> T* ptr(int64_t address) { return reinterpret_cast<T*>(address); }

}  // namespace

// Entry points take addresses and the stream handle (checked by the Python ops): the source then needs only the
// CUDA toolkit's headers, which keeps its compile check to seconds. They return the launch's cudaError_t.
int gemv(int64_t x, int64_t qweight, int64_t lut, int64_t out, int64_t bits, bool fp16, int64_t tokens, int64_t N,
         int64_t words, int64_t stream) {
  if (tokens < 1 || tokens > 8 || words % 4) return cudaErrorInvalidValue;
  cudaError_t error;
  ANYPREC_DISPATCH(bits, gemv_bits, ptr<const void>(x), ptr<const void>(qweight), ptr<const void>(lut), ptr<void>(out),
                   fp16, tokens, N, words, ptr<CUstream_st>(stream));
  return error ? error : cudaGetLastError();
}

int dequant(int64_t qweight, int64_t lut, int64_t out, int64_t bits, bool fp16, int64_t N, int64_t words,
            int64_t stream) {
  if (words % 4) return cudaErrorInvalidValue;
  cudaError_t error;
  ANYPREC_DISPATCH(bits, dequant_bits, ptr<const void>(qweight), ptr<const void>(lut), ptr<void>(out), fp16, N, words,
                   ptr<CUstream_st>(stream));
  return error ? error : cudaGetLastError();
}
"""

CPP_DECLARATIONS = """
int gemv(int64_t x, int64_t qweight, int64_t lut, int64_t out, int64_t bits, bool fp16, int64_t tokens, int64_t N,
         int64_t words, int64_t stream);
int dequant(int64_t qweight, int64_t lut, int64_t out, int64_t bits, bool fp16, int64_t N, int64_t words,
            int64_t stream);
"""


# Activations and dequantised weights on CPU: bf16 where the CPU multiplies it natively (quantize.CPU_DTYPE's rule).
CPU_DTYPE = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32
CPU_KERNELS = True  # False: gather from the tables on every call, the reference (tests compare the two)

# The device type whose tensors the kernels take. tests/cuda_emu builds CUDA_SOURCE for the CPU and sets "cpu" while
# its tests run, so that the same checks, launches, ops and AnyPrecLinear.forward run there.
KERNEL_DEVICE = "cuda"


@functools.cache
def kernels():
    """The compiled kernels: built on first CUDA use (a minute), then loaded from torch's extension cache."""
    from torch.utils.cpp_extension import load_inline
    return load_inline("anyprec_kernels", CPP_DECLARATIONS, CUDA_SOURCE, functions=["gemv", "dequant"],
                       extra_cuda_cflags=["-O3"])


def _check(qweight: Tensor, lut: Tensor, bits: int, out: Tensor, *wide: Tensor):
    """Shapes, dtypes, one device, contiguity; 16-byte alignment for the planes and the `wide` tensors (read or
    written 16 bytes at a time: the GEMV's x, the dequantize kernel's out)."""
    N, words = qweight.shape[1:]
    shapes_ok = (MIN_BITS <= bits <= MAX_BITS and qweight.dtype == torch.int32 and qweight.shape[0] >= bits
                 and lut.dtype == torch.float16 and lut.shape == (N, 2**bits))
    if not shapes_ok:
        raise ValueError(f"anyprec kernels take int32 planes [>= {bits}, N, Kp/32] and an fp16 table [N, 2^{bits}]; "
                         f"got {qweight.dtype} {tuple(qweight.shape)} and {lut.dtype} {tuple(lut.shape)}")
    if words % 4:
        raise ValueError(f"anyprec planes of {words} words a row are not layout {LAYOUT} (Kp a multiple of 128): "
                         f"re-quantize with python anyprec.py")
    if not all(t.device == qweight.device and t.device.type == KERNEL_DEVICE and t.is_contiguous()
               for t in (qweight, lut, out, *wide)):
        raise ValueError(f"anyprec kernels take contiguous tensors on one {KERNEL_DEVICE} device")
    if any(t.data_ptr() % 16 for t in (qweight, *wide)):
        raise ValueError("anyprec kernels move activations and weights 16 bytes at a time: align them to 16 bytes")
    if out.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"anyprec kernels write bf16 or fp16, not {out.dtype}")


def _launch(entry, device: torch.device, *args) -> int:
    """entry(*args, stream): on `device`'s current stream, where CUDA graphs capture it; 0 on the tests' emulator."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return entry(*args, torch.cuda.current_stream().cuda_stream if device.type == "cuda" else 0)


def gemv_into(x: Tensor, qweight: Tensor, lut: Tensor, bits: int, out: Tensor):
    """out [tokens, N] = x [tokens <= 8, Kp] @ W_bits^T, launched on the current stream."""
    _check(qweight, lut, bits, out, x)
    tokens, N = out.shape
    if tokens == 0:
        return
    if x.dtype != out.dtype or x.shape != (tokens, 32 * qweight.shape[2]) or N != qweight.shape[1] or tokens > 8:
        raise ValueError(f"anyprec gemv: x {tuple(x.shape)} and out {tuple(out.shape)} do not fit planes "
                         f"{tuple(qweight.shape)} (1..8 tokens, x padded to Kp, one dtype)")
    error = _launch(kernels().gemv, qweight.device, x.data_ptr(), qweight.data_ptr(), lut.data_ptr(), out.data_ptr(),
                    bits, x.dtype == torch.float16, tokens, N, qweight.shape[2])
    if error:
        raise RuntimeError(f"anyprec gemv launch failed with CUDA error {error}")


def dequant_into(qweight: Tensor, lut: Tensor, bits: int, out: Tensor):
    """out [N, Kp] = W_bits, launched on the current stream."""
    _check(qweight, lut, bits, out, out)
    if out.shape != (qweight.shape[1], 32 * qweight.shape[2]):
        raise ValueError(f"anyprec dequant: out {tuple(out.shape)} does not fit planes {tuple(qweight.shape)}")
    error = _launch(kernels().dequant, qweight.device, qweight.data_ptr(), lut.data_ptr(), out.data_ptr(), bits,
                    out.dtype == torch.float16, out.shape[0], qweight.shape[2])
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

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--seed_precision", type=int, default=3, help="width of the k-means seed (3..8)")
    p.add_argument("--parent_precision", type=int, default=8, help="widest width kept (seed..8)")
    p.add_argument("--calibration_file", type=Path, default=None, help="default: the stdlib train split")
    p.add_argument("--calibration_samples", type=cli.at_least(1), default=128)
    p.add_argument("--calibration_seq_len", type=cli.at_least(2), default=512)
    p.add_argument("--device", type=cli.device, default=None, help="where to quantize (default cuda when there is one)")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    from eval import calibration_windows
    from generate import default_device, load_model
    from tokenizer import load_tokenizer
    args = parse_args(argv)
    device = args.device or default_device()
    t0 = time.perf_counter()
    check_widths(args.seed_precision, args.parent_precision)
    load_state(args.checkpoint_path, unquantized=True)  # before any work
    model = load_model(args.checkpoint_path, device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.calibration_seq_len > model.config.block_size:
        raise ValueError(f"--calibration_seq_len {args.calibration_seq_len} exceeds the model's block_size "
                         f"{model.config.block_size}")
    windows = calibration_windows(load_tokenizer(args.checkpoint_path.parent), args.calibration_samples,
                                  args.calibration_seq_len, args.calibration_file)
    fisher = fisher_diag(model, windows)
    del model  # the quantizer needs the file's weights and the Fisher information, not the model
    path, error = quantize(args.checkpoint_path, fisher, args.seed_precision, args.parent_precision, device)
    rows = [("written", str(path)), ("size", f"{path.stat().st_size / 1e6:.1f} MB"),
            ("time", f"{time.perf_counter() - t0:.1f} s")]
    rows += [(f"{p}-bit error", f"{e:.2e} (||W - W_p||^2 / ||W||^2)") for p, e in error.items()]
    print("\n".join(f"{name:>12}: {value}" for name, value in rows))
    return path


if __name__ == "__main__":
    cli.run(main)
