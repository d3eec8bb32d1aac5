"""Weight-only quantization: int8 per output channel, int4 per group (round-to-nearest or GPTQ), with CUDA GEMV kernels.

    python quantize.py --checkpoint_path DIR/model.pth --mode int8                 # -> DIR/model_int8.pth
    python quantize.py --checkpoint_path DIR/model.pth --mode int4 --groupsize 128 # -> DIR/model_int4.g128.pth
    python quantize.py --checkpoint_path DIR/model.pth --mode int4-gptq            # -> DIR/model_int4-gptq.g128.pth

Every nn.Linear is quantized except an output head tied to the embedding table; embeddings and norms keep their
dtype. The file records its format under "quantization", so generate.py, eval.py and tp.py load it with no flag.

Storage, per quantized Linear of N outputs and K inputs (tensors are buffers, kept in these dtypes at load):
  int8             weight            int8  [N, K]       w[n, k] = weight[n, k] * scales[n]
                   scales            bf16  [N]
  int4, int4-gptq  weight            uint8 [N, K/2]     byte i of row n: k = 2i in the low nibble, k = 2i+1 in the high
                   scales_and_zeros  bf16  [N, K/g, 2]  w[n, k] = (code - 8) * scale + zero, (scale, zero) of group k // g
Output features are dim 0 of every tensor: a column-parallel shard slices rows. Input features are dim 1: a row-parallel
shard slices weight columns (K/2 bytes for int4) and, for int4, whole groups of scales_and_zeros, so the shard's width
must be a multiple of the group size; int8's scales stay whole. The group size is not stored: it is K divided by
scales_and_zeros.shape[1]. Each module's `shard` method cuts its own tensors this way (tp.py asks it to), and the
shards are contiguous, as the kernels need.

On CUDA (bf16 or fp16 activations) a call runs the GEMV kernels below for a few tokens, the tensor-core kernel up to 64
tokens (linear_kernel says which, by token count), and beyond that dequantizes the weight to the activation dtype and
calls the matmul. Elsewhere the PyTorch path computes the same function.

Needs model.py and cli.py; its command line also eval.py (calibration text) and generate.py (loading).
"""
import argparse
import contextlib
import functools
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import cli
from model import DEFAULT_CHECKPOINT, atomic_write, linear_names, load_state, narrow_ranges

MODES = ("int8", "int4", "int4-gptq")
GROUPSIZES = (32, 64, 128, 256)
GEMV_MAX_TOKENS = 8  # the most tokens (batch x positions) the GEMV kernels take
MMA_MAX_TOKENS = 64  # the most the tensor-core kernel takes


def linear_kernel(tokens: int, int4: bool) -> str:
    """Which kernel a quantized Linear runs on CUDA for this many tokens: "gemv", "mma" (tensor cores) or "matmul"
    (int4: dequantize the weight, then the matmul; int8: the matmul of the dequantized weight). The thresholds, below,
    come from scripts/kernel_report.py's H200 predictions, not yet from a GPU measurement."""
    if tokens < 1:
        return "matmul"
    if tokens <= (INT4_GEMV_TOKENS if int4 else INT8_GEMV_TOKENS):
        return "gemv"
    return "mma" if tokens <= MMA_MAX_TOKENS else "matmul"


# Up to this many tokens the GEMV, then tensor cores. scripts/kernel_report.py's speed-up over bf16's matmul bound on
# H200, 4096x4096 and 4096x11008: int4 GEMV 3.76x at 1-4 tokens, 3.13x at 5-6, 2.35x at 7-8; int8 GEMV 2.00x at 1-8;
# the tensor-core kernel's 8-token instance (which 1..8 tokens run) int4 3.37-3.44x, int8 1.78-1.91x (its split-K
# partial sums cost int8 the most). Predictions, not measurements: re-derive when either kernel changes.
INT4_GEMV_TOKENS = 4
INT8_GEMV_TOKENS = 8

# ---------------------------------------------------------------------------------------------------------------
# The formats in PyTorch: the reference every kernel is tested against.


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (int8 weight [N, K], bf16 scales [N]), symmetric: the largest |w| of a row maps to 127."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    weight = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return weight, scales


def dequantize_int8(weight: Tensor, scales: Tensor) -> Tensor:
    return weight.float() * scales.float()[:, None]  # [N, K] fp32


def int4_params(groups: Tensor) -> tuple[Tensor, Tensor]:
    """groups [..., g] -> bf16 (scale, zero) [...]: codes 0..15 span min..max; zero is the value of code 8."""
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # near the group's middle: the bf16 rounding costs least there
    return scale, zero


def int4_codes(w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return ((w - zero.float()) / scale.float()).round().add(8).clamp(0, 15).to(torch.uint8)


def pack_int4(codes: Tensor) -> Tensor:
    """codes uint8 [N, K] (values 0..15) -> uint8 [N, K/2]: even k in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(weight: Tensor) -> Tensor:
    return torch.stack([weight & 15, weight >> 4], dim=-1).reshape(weight.shape[0], -1)  # [N, K]


def quantize_int4(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (uint8 weight [N, K/2], bf16 scales_and_zeros [N, K/groupsize, 2]), round to nearest."""
    N, K = w.shape
    groups = w.float().reshape(N, K // groupsize, groupsize)
    scale, zero = int4_params(groups)
    codes = int4_codes(groups, scale[..., None], zero[..., None]).reshape(N, K)
    return pack_int4(codes), torch.stack([scale, zero], dim=-1)


def dequantize_int4(weight: Tensor, scales_and_zeros: Tensor) -> Tensor:
    N, G = scales_and_zeros.shape[:2]
    codes = unpack_int4(weight).reshape(N, G, -1).float()
    scale, zero = scales_and_zeros.float().unbind(-1)
    return ((codes - 8) * scale[..., None] + zero[..., None]).reshape(N, -1)  # [N, K] fp32; (code - 8) * scale is exact


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels. Decode reads every weight once per token, so a GEMV at 1..8 tokens is a streaming problem: each lane
# loads 16 bytes of a row at a time (a row: 64 contiguous bytes a step), a round of loads in flight while the previous
# one computes, dequantizes in registers to 16-bit integers and multiplies on tensor cores with fp32 sums, the scales
# applied to those sums; a block's warps split K and add up through shared memory at the end.

CUDA_SOURCE = r"""
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

// ---- Decode GEMVs on tensor cores: out [M, N] = x [M, K] W^T for M <= 8 tokens.
// One warp-wide mma.sync multiplies a 16x16 tile of weights by 16 activations of up to 8 tokens with fp32 sums: a lane
// spends one instruction on 8 weights, so the cost of a weight byte hardly grows with the tokens. A block owns 16 rows
// (a tile) and its WARPS warps split K. A step is 64 bytes of each row: lane 4g + t reads bytes 16t..16t+15 of rows g
// and g + 8 (a row's step is 64 contiguous bytes). A warp loads a round of STEPS steps while it computes the last.
constexpr int WARPS = 8;
constexpr int TILES = 1;  // 16-row tiles a block (each warp works on all of them)

// Weights are read exactly once: keep them out of L1, which then holds the activations every block re-reads.
__device__ __forceinline__ uint4 load_weights(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
#else  // the same 16 bytes without the cache hint: the tests' CPU emulator (tests/cuda_emu) cannot run PTX
  return __ldg(reinterpret_cast<const uint4*>(p));
#endif
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// bf16 is the top half of an fp32: widening is a shift or a mask.
__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v); else return __float2bfloat16_rn(v);
}

// (v & MASK) | c, or (v & MASK) ^ c, as one LOP3. nvcc compiles the C++ to two when MASK and c are both constants (an
// instruction takes one immediate); lop3 gets c in a register, set once outside the loops.
template <uint32_t MASK, bool XOR = false>
__device__ __forceinline__ uint32_t lop3(uint32_t v, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(r) : "r"(v), "n"(MASK), "r"(c), "n"(XOR ? 0x6a : 0xea));
  return r;
#else
  return XOR ? (v & MASK) ^ c : (v & MASK) | c;
#endif
}

// Small integers as T without a conversion: OR-ing u < 16 into the low mantissa bits of MAGIC gives MAGIC + u exactly,
// two to a 32-bit word in one LOP3. bf16 has 7 mantissa bits, so at 128 they count units; fp16 has 10, units at 1024.
template <typename T> __device__ __forceinline__ constexpr uint32_t magic2() {
  return std::is_same_v<T, __half> ? 0x64006400u : 0x43004300u;
}
template <typename T> __device__ __forceinline__ constexpr float magic() {
  return std::is_same_v<T, __half> ? 1024.f : 128.f;
}
template <typename T> __device__ __forceinline__ constexpr uint32_t ones2() {  // 1.0 twice
  return std::is_same_v<T, __half> ? 0x3c003c00u : 0x3f803f80u;
}

// d += a b on one warp's fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"): a is 16x16,
// b 16x8, both in T, d 16x8 in fp32. Lane 4g + t holds, two 16-bit elements to a register (the first in the low half):
// a[0] = a[g][2t, 2t+1], a[1] = a[g+8][2t, 2t+1], a[2] = a[g][2t+8, 2t+9], a[3] = a[g+8][2t+8, 2t+9];
// b[0] = b[2t, 2t+1][g], b[1] = b[2t+8, 2t+9][g]; d[0, 1] = d[g][2t, 2t+1], d[2, 3] = d[g+8][2t, 2t+1].
template <typename T>
__device__ __forceinline__ void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __half>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(CUDA_EMU)  // tests/cuda_emu: the same instruction on the CPU
  emu_mma_m16n8k16<T>(d, a, b, d);
#endif
}

// What a lane that puts no activations into B loads instead (its x pointer stays here; a round's offsets are < 8 KB).
__device__ uint4 zeros[512];

// The mma's A is 16 rows of weights, B the activations. The 16 k of an mma are spread over the 4 lanes of a quad,
// lane t holding k-slots 2t, 2t+1, 2t+8, 2t+9 of A and B; which input a slot stands for is free as long as A and B
// agree, so lane t's slots hold 4 weights of its own 16 bytes, and it puts the matching activations into B.
// A weight enters A as MAGIC + u, u = its 4-bit code (int4) or one nibble of it (int8, two mmas): the LOP3 above, for
// two weights. MAGIC comes off after the sums, as MAGIC times the sum of the activations, X, which a third mma with
// A = 1 gives. Products of 16-bit values are exact in fp32, and so the sums are those of the exact weights.
//
// int4: scale and zero change every group (32 << group_shift weights, as few as a lane's 16 bytes), but one mma sums
// over all four lanes' chunks. So a column of B holds one chunk and one token: column 2t + e of token tile j is token
// 2j + e in the k-slots of lane t and 0 in the others (a lane puts in activations only if its g / 2 is its t). D's
// columns 2t and 2t + 1, held by lane t, are then sums over lane t's own chunk, which it scales with its own group's
// (scale, zero): over a chunk, sum w x = scale (D - (MAGIC + 8) X) + zero X for w = (code - 8) scale + zero, which
// are dequantize_int4's weights, never rounded to T.
// int8: A holds the nibbles of b + 128 = 16 hi + lo, b the signed byte; column m of B is token m; the row's scale
// multiplies the finished sum.
template <int M, typename T, bool INT4>
__global__ void __launch_bounds__(WARPS * 32, (INT4 && M > 2 ? 1 : 2)) gemv_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ weight, const void* __restrict__ params,
    T* __restrict__ out, int N, int K, int group_shift) {
  constexpr int JT = INT4 ? (M + 1) / 2 : 1;  // token tiles: int4 B holds 2 tokens (x 4 chunks), int8 B 8 tokens
  constexpr int STEPS = 2;                    // a round: 32 bytes of each row a lane, twice over
  constexpr int X_STEP = INT4 ? 128 : 64;     // the inputs in a step
  // int4 at one token: B's second column of a chunk would be token 1, so it takes the round's second step instead, and
  // the two steps' mmas share each B (the mma of step u reads D's column 2t + u).
  constexpr bool SHARED = INT4 && M == 1;
  constexpr int PER_B = SHARED ? STEPS : 1;  // steps an operand B serves
  constexpr uint32_t MAGIC = magic2<T>();
  static_assert(sizeof(T) * (X_STEP * WARPS * (STEPS - 1) + X_STEP / 4) <= sizeof(zeros), "a round reads past zeros");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int row0 = blockIdx.x * 16 * TILES;
  const int row_bytes = INT4 ? K / 2 : K, chunks = row_bytes / 16, steps = (chunks + 3) / 4, whole_steps = chunks / 4;
  const int groups = chunks >> group_shift;  // int4: a chunk is 32 weights, a group 1 << group_shift chunks

  // This lane's bytes in step `warp` of its rows (rows past N repeat the last row and are never stored), the rows'
  // scales and zeros, and the activations it puts into B: for int4 column g of token tile j if that column's chunk,
  // g / 2, is its own; for int8 column g.
  const uint8_t* w_at[TILES][2];
  // sz_at: at the group of `chunk`, this lane's chunk in the round's first step. It moves by the groups the chunk
  // crosses, exact for any group size (below 2048 inputs a group, always 32 >> group_shift a step).
  const uint32_t* sz_at[TILES][2];
  int chunk = 4 * warp + t;
  const auto groups_to = [&](int c) { return (c >> group_shift) - (chunk >> group_shift); };  // from chunk's
  for (int i = 0; i < TILES; ++i)
    for (int h = 0; h < 2; ++h) {
      const int n = min(row0 + 16 * i + 8 * h + g, N - 1);
      w_at[i][h] = weight + size_t(n) * row_bytes + 64 * warp + 16 * t;
      sz_at[i][h] = static_cast<const uint32_t*>(params) + size_t(n) * groups + ((4 * warp + t) >> group_shift);
    }
  const T* x_at[JT];
  int x_round[JT];  // how far x_at moves a round: 0 for a lane reading zeros
  for (int j = 0; j < JT; ++j) {
    const int m = SHARED ? 0 : INT4 ? 2 * j + g % 2 : g, step = SHARED ? g % 2 : 0;
    const bool puts = m < M && (!INT4 || g / 2 == t);
    x_at[j] = puts ? x + size_t(m) * K + X_STEP * (warp + step * WARPS) + X_STEP / 4 * t
                   : reinterpret_cast<const T*>(zeros);
    x_round[j] = puts ? X_STEP * WARPS * STEPS : 0;
  }

  float acc[TILES][2][INT4 ? M : 1] = {};                    // int4: this lane's share of its rows, every token
  float lo[TILES][4] = {}, hi[TILES][4] = {}, sums[4] = {};  // int8: D of the low and of the high nibbles, and X

  // A round's loads, issued a round before its math. TAIL: chunks past the end of the row are not read.
  struct Round { uint4 q[STEPS][TILES][2]; uint32_t sz[STEPS][TILES][2]; };
  const auto load = [&](Round& r, int s, auto tail) {
    constexpr bool TAIL = decltype(tail)::value;
#pragma unroll
    for (int u = 0; u < STEPS; ++u) {
      const bool in = !TAIL || 4 * (s + u * WARPS) + t < chunks;  // this lane's chunk is in the row
#pragma unroll
      for (int i = 0; i < TILES; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          r.q[u][i][h] = in ? load_weights(w_at[i][h] + 64 * WARPS * u) : make_uint4(0, 0, 0, 0);
          if constexpr (INT4) r.sz[u][i][h] = in ? __ldg(sz_at[i][h] + groups_to(chunk + 4 * WARPS * u)) : 0u;
        }
    }
#pragma unroll
    for (int i = 0; i < TILES; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        w_at[i][h] += 64 * WARPS * STEPS;
        sz_at[i][h] += groups_to(chunk + 4 * WARPS * STEPS);
      }
    chunk += 4 * WARPS * STEPS;
  };
  // Its math. TAIL: a lane whose chunk is past the end of the row puts zeros into B.
  const auto math = [&](const Round& r, int s, auto tail) {
    constexpr bool TAIL = decltype(tail)::value;
#pragma unroll
    for (int u = 0; u < STEPS; u += PER_B) {  // the steps u..u + PER_B - 1, one B operand
      const int x_step = SHARED ? g % 2 : u;  // the step whose activations this lane puts in
      const bool in = !TAIL || 4 * (s + x_step * WARPS) + t < chunks;
      const auto x8 = [&](int j, int at) {  // 8 activations at input `at` of this lane's chunk
        const T* p = in ? x_at[j] + X_STEP * WARPS * u + at : reinterpret_cast<const T*>(zeros);
        return __ldg(reinterpret_cast<const uint4*>(p));
      };
      if constexpr (INT4) {
        float d[PER_B][TILES][JT][4] = {}, X[JT][4] = {};
#pragma unroll
        for (int w = 0; w < 4; ++w) {  // word w of the chunk: codes of inputs 8w..8w+7, input 8w + k in nibble k
          // Activations 8w..8w+7 paired as the nibbles below pair: (0, 4) (1, 5) for the first mma, (2, 6) (3, 7).
          uint32_t b[JT][2][2];
#pragma unroll
          for (int j = 0; j < JT; ++j) {
            const uint4 v = x8(j, 8 * w);
            b[j][0][0] = __byte_perm(v.x, v.z, 0x5410), b[j][0][1] = __byte_perm(v.x, v.z, 0x7632);
            b[j][1][0] = __byte_perm(v.y, v.w, 0x5410), b[j][1][1] = __byte_perm(v.y, v.w, 0x7632);
          }
#pragma unroll
          for (int half = 0; half < 2; ++half) {
#pragma unroll
            for (int p = 0; p < PER_B; ++p)
#pragma unroll
              for (int i = 0; i < TILES; ++i) {
                // code >> (8 half + 4 e): nibbles 2 half + e and 2 half + e + 4 at the bottom of the two half-words
                uint32_t a[4];
#pragma unroll
                for (int e = 0; e < 2; ++e)
#pragma unroll
                  for (int h = 0; h < 2; ++h)
                    a[2 * e + h] = lop3<0x000f000fu>(word(r.q[u + p][i][h], w) >> (8 * half + 4 * e), MAGIC);
#pragma unroll
                for (int j = 0; j < JT; ++j) mma<T>(d[p][i][j], a, b[j][half]);
              }
            const uint32_t one[4] = {ones2<T>(), ones2<T>(), ones2<T>(), ones2<T>()};
#pragma unroll
            for (int j = 0; j < JT; ++j) mma<T>(X[j], one, b[j][half]);
          }
        }
#pragma unroll
        for (int p = 0; p < PER_B; ++p)
#pragma unroll
          for (int i = 0; i < TILES; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint32_t sz = r.sz[u + p][i][h];
              const float scale = bf16_lo(sz), zero = fmaf(-(magic<T>() + 8), scale, bf16_hi(sz));
#pragma unroll
              for (int j = 0; j < JT; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  float& sum = acc[i][h][SHARED ? 0 : 2 * j + e];
                  if (SHARED ? e == p : 2 * j + e < M)
                    sum = fmaf(zero, X[j][e], fmaf(scale, d[p][i][j][2 * h + e], sum));
                }
            }
      } else {
#pragma unroll
        for (int w = 0; w < 4; ++w) {  // word w of the chunk: inputs 4w..4w+3, input 4w + k in byte k
          // Activations paired as the bytes below pair: (0, 2) (1, 3).
          const uint4 v = x8(0, 8 * (w / 2));
          const uint32_t x01 = w % 2 ? v.z : v.x, x23 = w % 2 ? v.w : v.y;
          const uint32_t b[2] = {__byte_perm(x01, x23, 0x5410), __byte_perm(x01, x23, 0x7632)};
#pragma unroll
          for (int i = 0; i < TILES; ++i) {
            uint32_t al[4], ah[4];
#pragma unroll
            for (int p = 0; p < 2; ++p)
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const uint32_t bytes = word(r.q[u][i][h], w) >> (8 * p);  // bytes p and p + 2 at the bottom
                al[2 * p + h] = lop3<0x000f000fu>(bytes, MAGIC);
                // the high nibble of b + 128 is that of b with its top bit flipped
                ah[2 * p + h] = lop3<0x000f000fu, true>(bytes >> 4, MAGIC | 0x00080008u);
              }
            mma<T>(lo[i], al, b);
            mma<T>(hi[i], ah, b);
          }
          const uint32_t one[4] = {ones2<T>(), ones2<T>(), ones2<T>(), ones2<T>()};
          mma<T>(sums, one, b);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < JT; ++j) x_at[j] += x_round[j];
  };

  // Whole rounds, two at a time so that the two buffers take turns without copies; then what is left, as one round.
  const auto whole = [&](int s) { return s + (STEPS - 1) * WARPS < whole_steps; };
  constexpr int ROUND = STEPS * WARPS;
  Round r0, r1;
  int s = warp;
  if (whole(s)) {
    load(r0, s, std::false_type());
    for (;;) {
      if (!whole(s + ROUND)) { math(r0, s, std::false_type()); s += ROUND; break; }
      load(r1, s + ROUND, std::false_type());
      math(r0, s, std::false_type());
      s += ROUND;
      if (!whole(s + ROUND)) { math(r1, s, std::false_type()); s += ROUND; break; }
      load(r0, s + ROUND, std::false_type());
      math(r1, s, std::false_type());
      s += ROUND;
    }
  }
  if (s < steps) {
    load(r0, s, std::true_type());
    math(r0, s, std::true_type());
  }

  // Sum over the warps (and for int4 the 4 chunks of a quad) through shared memory, a thread per output.
  __shared__ float partial[WARPS][INT4 ? 4 : 1][16 * TILES][M];
  for (int i = 0; i < TILES; ++i)
    for (int h = 0; h < 2; ++h) {
      const int r = 16 * i + 8 * h + g;
      if constexpr (INT4) {
        for (int m = 0; m < M; ++m) partial[warp][t][r][m] = acc[i][h][m];
      } else {  // sum q x = 16 (hi - MAGIC X) + (lo - MAGIC X) - 128 X, for q = 16 hi + lo - 128
        for (int e = 0; e < 2; ++e)
          if (2 * t + e < M)
            partial[warp][0][r][2 * t + e] =
                fmaf(16.f, hi[i][2 * h + e], fmaf(-(17 * magic<T>() + 128), sums[e], lo[i][2 * h + e]));
      }
    }
  __syncthreads();
  for (int o = threadIdx.x; o < 16 * TILES * M; o += WARPS * 32) {
    const int r = o / M, m = o % M, n = row0 + r;
    if (n >= N) continue;
    float sum = 0.f;
    for (int w = 0; w < WARPS; ++w)
      for (int q = 0; q < (INT4 ? 4 : 1); ++q) sum += partial[w][q][r][m];
    if constexpr (!INT4) sum *= bf16_lo(static_cast<const uint16_t*>(params)[n]);
    out[size_t(m) * N + n] = from_float<T>(sum);
  }
}

// ---- Dequantization for prefill, in fp32: nibble j of a half-word masked in place is q * 16^j, so the float is
// 2^23 + q * 16^j; subtracting 2^23 + 8 * 16^j leaves (q - 8) * 16^j, and scale_j = scale / 16^j cancels the 16^j
// inside one FMA with the zero: w = (q - 8) * scale + zero with a single rounding, bit for bit what dequantize_int4
// computes.
__device__ __forceinline__ void dequant_int4x8(uint32_t w, const float scale_j[4], float zero, float out[8]) {
  for (int j = 0; j < 4; ++j) {
    const uint32_t mask = 0xFu << (4 * j);
    const float bias = 8388608.f + 8.f * float(1 << (4 * j));
    out[j] = fmaf(__uint_as_float((w & mask) | 0x4B000000u) - bias, scale_j[j], zero);
    out[j + 4] = fmaf(__uint_as_float(((w >> 16) & mask) | 0x4B000000u) - bias, scale_j[j], zero);
  }
}

// For prefill: the whole int4 weight in T, 8 weights (one 32-bit word in, 16 bytes out) per thread and step.
template <typename T>
__global__ void int4_dequantize_kernel(const uint32_t* __restrict__ weight, const uint32_t* __restrict__ scales_and_zeros,
                                       T* __restrict__ out, int64_t words, int words_per_row, int groups, int group_shift) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < words; i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t sz = __ldg(scales_and_zeros + i / words_per_row * groups + (int(i % words_per_row) >> group_shift));
    const float scale_j[4] = {bf16_lo(sz), bf16_lo(sz) / 16, bf16_lo(sz) / 256, bf16_lo(sz) / 4096};
    float w[8];
    dequant_int4x8(__ldg(weight + i), scale_j, bf16_hi(sz), w);
    alignas(16) T w8[8];
    for (int j = 0; j < 8; ++j) w8[j] = from_float<T>(w[j]);
    reinterpret_cast<uint4*>(out)[i] = *reinterpret_cast<const uint4*>(w8);
  }
}

// Calls f(std::integral_constant<int, M>) for the runtime m in 1..8: one kernel per batch size, registers sized to it.
template <int M = 1, typename F>
void with_batch(int m, F f) {
  if (m == M) f(std::integral_constant<int, M>());
  else if constexpr (M < 8) with_batch<M + 1>(m, f);
}

template <typename F>
void with_dtype(bool fp16, F f) {
  if (fp16) f(__half());
  else f(__nv_bfloat16());
}

template <typename T> T* ptr(int64_t address) { return reinterpret_cast<T*>(address); }

}  // namespace

// Entry points take addresses, sizes and the stream handle, and return the launch's cudaError_t: the Python side
// (_check, gemv_into, dequantize_int4_into) checks shapes, dtypes, contiguity, alignment and the device first, and the
// source needs only the CUDA toolkit's headers.
// x [M, K] -> out [M, N], both bf16 or both fp16, 1 <= M <= 8, K % 16 == 0. int8: weight int8 [N, K], params = scales
// bf16 [N]. int4: weight uint8 [N, K/2], params = scales_and_zeros bf16 [N, K/g, 2], g = 32 << group_shift.
int gemv(int64_t x, int64_t weight, int64_t params, int64_t out, bool int4, bool fp16, int64_t M, int64_t N,
         int64_t K, int64_t group_shift, int64_t stream) {
  if (M < 1 || M > 8) return cudaErrorInvalidValue;
  const dim3 grid((N + 16 * TILES - 1) / (16 * TILES));
  with_dtype(fp16, [&](auto tag) {
    using T = decltype(tag);
    with_batch(M, [&](auto m) {
      const auto kernel = int4 ? gemv_kernel<decltype(m)::value, T, true> : gemv_kernel<decltype(m)::value, T, false>;
      kernel<<<grid, WARPS * 32, 0, ptr<CUstream_st>(stream)>>>(ptr<const T>(x), ptr<const uint8_t>(weight),
                                                                 ptr<const void>(params), ptr<T>(out), N, K,
                                                                 group_shift);
    });
  });
  return cudaGetLastError();
}

// weight uint8 [N, K/2], scales_and_zeros bf16 [N, K/g, 2] -> out [N, K] in bf16 or fp16, g = 32 << group_shift.
int int4_dequantize(int64_t weight, int64_t scales_and_zeros, int64_t out, bool fp16, int64_t N, int64_t K,
                    int64_t group_shift, int64_t stream) {
  const int64_t words = N * K / 8;  // 8 weights in one 32-bit word
  with_dtype(fp16, [&](auto tag) {
    using T = decltype(tag);
    int4_dequantize_kernel<T><<<int(std::min<int64_t>((words + 255) / 256, 65536)), 256, 0, ptr<CUstream_st>(stream)>>>(
        ptr<const uint32_t>(weight), ptr<const uint32_t>(scales_and_zeros), ptr<T>(out), words, int(K / 8),
        int(K >> (5 + group_shift)), int(group_shift) + 2);  // groups per row; the group size in words
  });
  return cudaGetLastError();
}
"""

CPP_DECLARATIONS = """
int gemv(int64_t x, int64_t weight, int64_t params, int64_t out, bool int4, bool fp16, int64_t M, int64_t N,
         int64_t K, int64_t group_shift, int64_t stream);
int int4_dequantize(int64_t weight, int64_t scales_and_zeros, int64_t out, bool fp16, int64_t N, int64_t K,
                    int64_t group_shift, int64_t stream);
"""


# The device type whose tensors the kernels take. tests/cuda_emu builds CUDA_SOURCE for the CPU and sets "cpu" while
# its tests run, so that the same checks, launches and ops run there.
KERNEL_DEVICE = "cuda"


@functools.cache
def kernels():
    """The compiled kernels: built on first CUDA use (a minute), then loaded from torch's extension cache."""
    from torch.utils.cpp_extension import load_inline
    return load_inline("quantize_kernels", [CPP_DECLARATIONS, MMA_DECLARATIONS], [CUDA_SOURCE, MMA_SOURCE],
                       functions=["gemv", "int4_dequantize", "mma"], extra_cuda_cflags=["-O3"])


def _check(weight: Tensor, params: Tensor, *tensors: Tensor) -> int:
    """Raise ValueError unless the kernels can read this weight: int8 [N, K] with bf16 scales [N], or uint8 [N, K/2]
    with bf16 scales_and_zeros [N, K/g, 2], g a power of two >= 32; it and the other `tensors` contiguous, 16-byte
    aligned (every load is 16 bytes wide) and on one device of KERNEL_DEVICE's type. Returns log2(g / 32), or 0 for
    int8."""
    N, int4 = weight.shape[0], weight.dtype == torch.uint8
    K = weight.shape[-1] * (2 if int4 else 1)
    groups = params.shape[1] if int4 and params.dim() == 3 and params.shape[1] > 0 else 1
    groupsize = K // groups
    fits = (params.shape == (N, groups, 2) and K % groups == 0 and groupsize >= 32 and groupsize & (groupsize - 1) == 0
            if int4 else params.shape == (N,))
    if weight.dim() != 2 or weight.dtype not in (torch.int8, torch.uint8) or params.dtype != torch.bfloat16 or not fits:
        raise ValueError(f"quantize kernels take an int8 weight [N, K] with bf16 scales [N], or a uint8 weight "
                         f"[N, K/2] with bf16 scales_and_zeros [N, K/g, 2] (g a power of two >= 32); got "
                         f"{weight.dtype} {tuple(weight.shape)} and {params.dtype} {tuple(params.shape)}")
    if not all(t.device == weight.device and t.device.type == KERNEL_DEVICE for t in (params, *tensors)):
        raise ValueError(f"quantize kernels take tensors on one {KERNEL_DEVICE} device")
    if not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (weight, params, *tensors)):
        raise ValueError("quantize kernels read the weight and its scales 16 bytes at a time: give them contiguous, "
                         "16-byte aligned tensors (a shard sliced on the GPU needs .contiguous()); falling back would "
                         "dequantize the whole weight on every call")
    return (groupsize // 32).bit_length() - 1 if int4 else 0


def _launch(entry, device: torch.device, *args) -> int:
    """entry(*args, stream): on `device`'s current stream, where CUDA graphs capture it; 0 on the tests' emulator."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return entry(*args, torch.cuda.current_stream().cuda_stream if device.type == "cuda" else 0)


def _linear_shapes(kernel: str, x: Tensor, weight: Tensor, params: Tensor, out: Tensor, max_tokens: int):
    """(group shift, M, N, K) of a call out [M, N] = x [M, K] @ W^T, or a ValueError saying what does not fit."""
    shift = _check(weight, params, x, out)
    M, N = out.shape
    K = weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
    if (x.dtype not in (torch.bfloat16, torch.float16) or out.dtype != x.dtype or x.shape != (M, K) or
            N != weight.shape[0] or M > max_tokens or K % 16):
        raise ValueError(f"quantize {kernel}: x {x.dtype} {tuple(x.shape)} and out {out.dtype} {tuple(out.shape)} do "
                         f"not fit a weight {tuple(weight.shape)} (1..{max_tokens} tokens, K a multiple of 16, one "
                         f"dtype, bf16 or fp16)")
    return shift, M, N, K


def gemv_into(x: Tensor, weight: Tensor, params: Tensor, out: Tensor):
    """out [M, N] = x [M <= 8, K] @ W^T in x's dtype (bf16 or fp16), launched on the current stream. W is int8 with
    params its scales, or int4 with params its scales_and_zeros."""
    shift, M, N, K = _linear_shapes("gemv", x, weight, params, out, GEMV_MAX_TOKENS)
    if M == 0:
        return
    error = _launch(kernels().gemv, x.device, x.data_ptr(), weight.data_ptr(), params.data_ptr(), out.data_ptr(),
                    weight.dtype == torch.uint8, x.dtype == torch.float16, M, N, K, shift)
    if error:
        raise RuntimeError(f"quantize gemv launch failed with CUDA error {error}")


def dequantize_int4_into(weight: Tensor, scales_and_zeros: Tensor, out: Tensor):
    """out [N, K] = dequantize_int4(weight, scales_and_zeros) in out's dtype (bf16 or fp16), on the current stream."""
    shift = _check(weight, scales_and_zeros, out)
    N, K = weight.shape[0], 2 * weight.shape[1]
    if weight.dtype != torch.uint8 or out.shape != (N, K) or out.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"quantize int4 dequantize: out {out.dtype} {tuple(out.shape)} does not fit a uint8 weight "
                         f"{tuple(weight.shape)} (out [N, K], bf16 or fp16)")
    error = _launch(kernels().int4_dequantize, weight.device, weight.data_ptr(), scales_and_zeros.data_ptr(),
                    out.data_ptr(), out.dtype == torch.float16, N, K, shift)
    if error:
        raise RuntimeError(f"quantize int4 dequantize launch failed with CUDA error {error}")


# ---------------------------------------------------------------------------------------------------------------
# The tensor-core kernel, for 2..64 tokens (Marlin's plan, Frantar et al. 2024): weights stream from global memory
# through a shared-memory pipeline of asynchronous copies, are dequantized in registers to the activations' dtype and
# multiplied on tensor cores (mma.sync.m16n8k16, fp32 accumulators); each activation fragment serves several 16-row
# weight tiles. It reads the file's layout itself (no repacked copy: the load holds no extra memory). The weight is the
# mma's A operand (16 rows x 16 inputs) and the tokens its N (8 a tile), so 1..8 tokens cost one mma per 256 weights.
# It follows CUDA_SOURCE in one translation unit (kernels() builds both) and uses its mma and from_float.

MMA_SOURCE = r"""
namespace tensor_core {

constexpr int MMA_WARPS = 4;                   // a block
constexpr int MMA_THREADS = 32 * MMA_WARPS;
constexpr int MMA_ROW_BYTES = 64;              // bytes of each weight row a pipeline stage holds: 128 int4 or 64 int8 inputs

// A block: TT tiles of 8 tokens (1, 2, 4 or 8: up to 8, 16, 32 or 64 tokens) times BN rows of the weight; each warp
// owns RW tiles of 16 rows, and each activation fragment it loads serves all RW. Python's mma_tile() mirrors this.
template <int TT, bool INT4>
struct MmaTile {
  static constexpr int RW = 4;
  static constexpr int BN = 16 * RW * MMA_WARPS;
  static constexpr int BK = INT4 ? 128 : 64;  // inputs a stage
  static constexpr int STAGES = TT == 8 ? 3 : 4;
  static constexpr int W_BYTES = BN * MMA_ROW_BYTES;  // a stage: the weights, then the activations, then (int4) the
  static constexpr int X_BYTES = 8 * TT * BK * 2;     // scale-zero pairs of each row's groups in it, 4 slots a row
  static constexpr int STAGE_BYTES = W_BYTES + X_BYTES + (INT4 ? BN * 16 : 0);
};

// ---- The PTX instructions, each behind a device function; tests/cuda_emu runs the same operations on the CPU.

// Two 8x8 matrices of 16-bit elements from shared memory: lanes 8j..8j+7 give the addresses of matrix j's eight
// 16-byte rows (lanes 16-31's are not read), and lane l gets in r[j] the 4 bytes 4(l%4)..4(l%4)+3 of row l/4 of
// matrix j.
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"(uint32_t(__cvta_generic_to_shared(row))));
#elif defined(CUDA_EMU)
  emu_ldmatrix<2>(r, row);
#endif
}

// Asynchronous copies to shared memory of 16 bytes or 4, reading the first `read` bytes of the source and zero-filling
// the rest (0: nothing read); ONCE: through L2 only (the weights, read once), else through L1 too (the activations and
// scales, which every block reads). A commit closes this thread's copies since the last into a group; wait<N> waits
// until at most the N newest groups are in flight.
template <bool ONCE>
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, int read) {
#if defined(__CUDA_ARCH__)
  if constexpr (ONCE)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(uint32_t(__cvta_generic_to_shared(shared))), "l"(global), "r"(read));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;"
                 :: "r"(uint32_t(__cvta_generic_to_shared(shared))), "l"(global), "r"(read));
#elif defined(CUDA_EMU)
  emu_cp_async(shared, global, 16, read);
#endif
}
__device__ __forceinline__ void cp_async_4(void* shared, const void* global, int read) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;"
               :: "r"(uint32_t(__cvta_generic_to_shared(shared))), "l"(global), "r"(read));
#elif defined(CUDA_EMU)
  emu_cp_async(shared, global, 4, read);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;" ::: "memory");
#elif defined(CUDA_EMU)
  emu_cp_async_commit();
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
#elif defined(CUDA_EMU)
  emu_cp_async_wait(N);
#endif
}

// Any function of three words, bit by bit, as one instruction: bit i of LUT is the result for the input bits (a, b, c)
// = (i >> 2 & 1, i >> 1 & 1, i & 1). nvcc compiles (q & mask) | magic to two.
template <int LUT>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
#else
  uint32_t d = 0;
  for (int i = 0; i < 8; ++i)
    if (LUT >> i & 1) d |= (i & 4 ? a : ~a) & (i & 2 ? b : ~b) & (i & 1 ? c : ~c);
  return d;
#endif
}
constexpr int AND_OR = (0xf0 & 0xcc) | 0xaa;  // (a & b) | c

// ---- Dequantization: two weights an instruction, in the activations' dtype T.

template <typename T> struct Pair { using type = __nv_bfloat162; };
template <> struct Pair<__half> { using type = __half2; };

// a * b + c on pairs, rounded once.
template <typename T>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  using P = typename Pair<T>::type;
  const P r = __hfma2(*reinterpret_cast<const P*>(&a), *reinterpret_cast<const P*>(&b), *reinterpret_cast<const P*>(&c));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// A bf16 (scale, zero) pair as (scale, scale) and (zero, zero) pairs in T.
template <typename T>
__device__ __forceinline__ void scale_pairs(uint32_t scale_zero, uint32_t& s2, uint32_t& z2) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 s = __float2half2_rn(__uint_as_float(scale_zero << 16));
    const __half2 z = __float2half2_rn(__uint_as_float(scale_zero & 0xffff0000u));
    s2 = *reinterpret_cast<const uint32_t*>(&s), z2 = *reinterpret_cast<const uint32_t*>(&z);
  } else {
    s2 = __byte_perm(scale_zero, 0, 0x1010), z2 = __byte_perm(scale_zero, 0, 0x3232);
  }
}

// int4: a 32-bit word holds 8 codes, nibble i = input i. Pair P (0..3): inputs (P, P + 4) as (code - 8) * scale +
// zero. A code masked into the mantissa of a power of two reads as that power plus the code (bf16: 128 + q, the nibble
// at bits 0-3 of a half; fp16: 1024 + q at bits 0-3, or 1024 + 16 q at bits 4-7), and one exact fma leaves q - 8; the
// second rounds the weight once.
template <typename T, int P>
__device__ __forceinline__ uint32_t dequant_int4(uint32_t q, uint32_t s2, uint32_t z2) {
  uint32_t v;
  if constexpr (std::is_same_v<T, __half> && P % 2 == 0)   // x 1 - 1032
    v = fma2<T>(lop3<AND_OR>(q >> (4 * P), 0x000f000fu, 0x64006400u), 0x3c003c00u, 0xe408e408u);
  else if constexpr (std::is_same_v<T, __half>)            // x 1/16 - 72
    v = fma2<T>(lop3<AND_OR>(q >> (4 * P - 4), 0x00f000f0u, 0x64006400u), 0x2c002c00u, 0xd480d480u);
  else                                                     // x 1 - 136
    v = fma2<T>(lop3<AND_OR>(q >> (4 * P), 0x000f000fu, 0x43004300u), 0x3f803f80u, 0xc308c308u);
  return fma2<T>(v, s2, z2);
}

// int8: a word holds 4 codes, byte i = input i. Out: the pairs (0, 1) and (2, 3) as exact integers; the row's scale
// multiplies the finished sum. fp16 holds 1024 + (b + 128) (the sign bit flipped) exactly; bf16 cannot, so the bytes go
// through fp32's 2^23 + (b + 128), and an integer below 256 in fp32 is its bf16 in the top half.
template <typename T>
__device__ __forceinline__ void dequant_int8(uint32_t q, uint32_t out[2]) {
  const uint32_t u = q ^ 0x80808080u;
  if constexpr (std::is_same_v<T, __half>) {
    out[0] = fma2<T>(__byte_perm(u, 0x64646464u, 0x4140), 0x3c003c00u, 0xe480e480u);  // x 1 - 1152
    out[1] = fma2<T>(__byte_perm(u, 0x64646464u, 0x4342), 0x3c003c00u, 0xe480e480u);
  } else {
    float f[4];
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(__byte_perm(u, 0x4b000000u, 0x7650 + i)) - 8388736.f;
    out[0] = __byte_perm(__float_as_uint(f[0]), __float_as_uint(f[1]), 0x7632);
    out[1] = __byte_perm(__float_as_uint(f[2]), __float_as_uint(f[3]), 0x7632);
  }
}

// ---- Shared memory. A stage's weight tile is BN rows of 64 bytes, four 16-byte chunks a row, the chunk index XORed
// with bits 1-2 of the row: the 8 rows an ldmatrix reads then fall in 8 different bank groups. Its activations are 8 TT
// rows of BK inputs, chunk index XORed with a function of the row that keeps a quarter-warp's loads on distinct banks.
__device__ __forceinline__ int weight_offset(int row, int chunk) { return 64 * row + 16 * (chunk ^ ((row >> 1) & 3)); }
__device__ __forceinline__ int x_chunk(int row, int chunk) { return chunk ^ (((row & 1) << 2) | (row & 2)); }

// out[m, n] = sum_k x[m, k] w[n, k] for the block's BN rows and its split of K (blockIdx.y of gridDim.y). The stages of
// the split stream through a ring of STAGES buffers: STAGES - 1 in flight while one is computed. Each warp owns RW row
// tiles; per 32 inputs (int4; 16 int8) of a tile a lane holds one 32-bit word of row g and one of row g + 8 (ldmatrix
// gives it bytes 4t..4t+3 of the rows' 16-byte chunk). The inputs a lane holds are not the mma's (2t, 2t+1, 2t+8, 2t+9),
// but the sum does not care which inputs go where as long as the activations pair up alike: a lane takes its tokens'
// 8 activations of the same inputs (16 bytes), and four byte permutes give the fragments of two int4 mma steps.
// int8 inputs 4t..4t+3 pair as they lie, and the fragment is 8 contiguous bytes.
template <int TT, typename T, bool INT4>
__global__ void __launch_bounds__(MMA_THREADS, 1) mma_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ weight, const void* __restrict__ params, T* __restrict__ out,
    float* __restrict__ partial, int* __restrict__ locks, int M, int N, int K, int group_shift) {
  using Tile = MmaTile<TT, INT4>;
  constexpr int RW = Tile::RW, BN = Tile::BN, BK = Tile::BK, STAGES = Tile::STAGES, X_CHUNKS = BK * 2 / 16;
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, row0 = threadIdx.x / 32 * 16 * RW;
  const int n0 = blockIdx.x * BN, row_bytes = INT4 ? K / 2 : K, groups = (K / 32) >> group_shift;
  const int gps_shift = group_shift < 2 ? 2 - group_shift : 0, gps = 1 << gps_shift;  // int4: groups a row a stage
  constexpr int stage_bytes = Tile::STAGE_BYTES;
  const int stages = (K + BK - 1) / BK, s0 = blockIdx.y * stages / gridDim.y, s1 = (blockIdx.y + 1) * stages / gridDim.y;

  // Copies of stage `stage` into `buffer`; past N, K or the split, zero-filled. Every stage a thread copies the same
  // pieces, a stage further on: chunk threadIdx.x % 4 (16 bytes) of weight rows threadIdx.x / 4 + 32 u (a quarter-warp
  // reads 64 contiguous bytes of each of 8 rows), X_COPIES activation chunks, and (int4) group threadIdx.x % gps of
  // rows threadIdx.x / gps + 128 / gps u. Offsets from one base a tensor fit in 32 bits.
  constexpr int X_ROWS = MMA_THREADS / X_CHUNKS, X_COPIES = (8 * TT + X_ROWS - 1) / X_ROWS;
  const int w_chunk = threadIdx.x % 4, w_row = threadIdx.x / 4, x_col = threadIdx.x % X_CHUNKS;
  const int x_row = threadIdx.x / X_CHUNKS, s_row = threadIdx.x >> gps_shift, s_group = threadIdx.x & (gps - 1);
  const uint8_t* w_base = weight + size_t(min(n0 + w_row, N - 1)) * row_bytes + 16 * w_chunk;
  const uint8_t* x_base = reinterpret_cast<const uint8_t*>(x + size_t(min(x_row, M - 1)) * K + 8 * x_col);
  const uint8_t* s_base = static_cast<const uint8_t*>(params) + 4 * (size_t(min(n0 + s_row, N - 1)) * groups + s_group);
  uint32_t rows_in = 0;  // bit u: weight rows w_row + 32 u, activation rows x_row + X_ROWS u, scale rows of copy u
  for (int u = 0; u < 8; ++u)
    rows_in |= (uint32_t(n0 + w_row + 32 * u < N) | uint32_t(x_row + X_ROWS * u < M) << 8 |
                uint32_t(n0 + s_row + (MMA_THREADS >> gps_shift) * u < N) << 16) << u;
  const auto load = [&](int stage, int buffer) {
    uint8_t* weights = smem + buffer * stage_bytes;
    const bool w_in = stage < s1 && stage * MMA_ROW_BYTES + 16 * w_chunk < row_bytes;
#pragma unroll
    for (int u = 0; u < BN / 32; ++u) {
      const bool in = w_in && (rows_in >> u & 1);
      cp_async_16<true>(weights + weight_offset(w_row + 32 * u, w_chunk),
                        w_base + (in ? uint32_t(32 * u * row_bytes + stage * MMA_ROW_BYTES) : 0u), in ? 16 : 0);
    }
    uint8_t* xs = weights + Tile::W_BYTES;
    const bool x_in = stage < s1 && stage * BK + 8 * x_col < K;
#pragma unroll
    for (int u = 0; u < X_COPIES; ++u) {
      const int m = x_row + X_ROWS * u;
      const bool in = x_in && (rows_in >> (8 + u) & 1);
      if (X_ROWS * X_COPIES == 8 * TT || m < 8 * TT)
        cp_async_16<false>(xs + m * BK * 2 + 16 * x_chunk(m, x_col),
                           x_base + (in ? uint32_t(2 * (X_ROWS * u * K + stage * BK)) : 0u), in ? 16 : 0);
    }
    if constexpr (INT4) {
      uint32_t* scales = reinterpret_cast<uint32_t*>(xs + Tile::X_BYTES);
      const int group = ((stage * BK) >> (5 + group_shift)) + s_group;
      const bool s_in = stage < s1 && group < groups;
#pragma unroll
      for (int u = 0; u < BN * 4 / MMA_THREADS; ++u) {
        if (u >= (BN * gps) / MMA_THREADS) break;  // the same for every thread
        const bool in = s_in && (rows_in >> (16 + u) & 1);
        cp_async_4(scales + 4 * (s_row + (MMA_THREADS >> gps_shift) * u) + s_group,
                   s_base + (in ? 4 * uint32_t((MMA_THREADS >> gps_shift) * u * groups + group - s_group) : 0u),
                   in ? 4 : 0);
      }
    }
  };

  float acc[RW][TT][4] = {};  // [row tile][token tile]: rows g, g + 8 x tokens 2t, 2t + 1
  const auto compute = [&](int buffer) {
    const uint8_t* weights = smem + buffer * stage_bytes;
    const uint8_t* xs = weights + Tile::W_BYTES;
    const uint32_t* scales = reinterpret_cast<const uint32_t*>(xs + Tile::X_BYTES);
#pragma unroll
    for (int chunk = 0; chunk < 4; ++chunk) {  // 16 bytes of every row: 32 int4 inputs (2 mma steps), 16 int8 (1)
      uint32_t q[RW][2], sz[RW][2];  // a row tile's word of row g and of row g + 8; int4: their (scale, zero) pairs
#pragma unroll
      for (int r = 0; r < RW; ++r) {
        ldmatrix_x2(q[r], weights + weight_offset(row0 + 16 * r + lane % 16, chunk));
        if constexpr (INT4)
          for (int i = 0; i < 2; ++i) sz[r][i] = scales[4 * (row0 + 16 * r + g + 8 * i) + (chunk >> group_shift)];
      }
#pragma unroll
      for (int step = 0; step < (INT4 ? 2 : 1); ++step) {
        uint32_t b[TT][2];  // activation fragments, paired as the codes are
#pragma unroll
        for (int j = 0; j < TT; ++j) {
          const int m = 8 * j + g;
          if constexpr (INT4) {  // inputs (8t + 2 step + e, 8t + 2 step + e + 4): 32-bit words step and step + 2
            const uint32_t* w = reinterpret_cast<const uint32_t*>(xs + m * BK * 2 + 16 * x_chunk(m, 4 * chunk + t));
            b[j][0] = __byte_perm(w[step], w[step + 2], 0x5410), b[j][1] = __byte_perm(w[step], w[step + 2], 0x7632);
          } else {  // inputs 4t..4t+3 as they lie
            const uint2 v = *reinterpret_cast<const uint2*>(xs + m * BK * 2 + 16 * x_chunk(m, 2 * chunk + t / 2) +
                                                            8 * (t % 2));
            b[j][0] = v.x, b[j][1] = v.y;
          }
        }
#pragma unroll
        for (int r = 0; r < RW; ++r) {
          uint32_t a[4];  // rows g, g + 8 of mma inputs 2t, 2t + 1, then of 2t + 8, 2t + 9
          if constexpr (INT4) {
            uint32_t s2[2], z2[2];
            scale_pairs<T>(sz[r][0], s2[0], z2[0]);
            scale_pairs<T>(sz[r][1], s2[1], z2[1]);
            if (step == 0) {
              a[0] = dequant_int4<T, 0>(q[r][0], s2[0], z2[0]), a[1] = dequant_int4<T, 0>(q[r][1], s2[1], z2[1]);
              a[2] = dequant_int4<T, 1>(q[r][0], s2[0], z2[0]), a[3] = dequant_int4<T, 1>(q[r][1], s2[1], z2[1]);
            } else {
              a[0] = dequant_int4<T, 2>(q[r][0], s2[0], z2[0]), a[1] = dequant_int4<T, 2>(q[r][1], s2[1], z2[1]);
              a[2] = dequant_int4<T, 3>(q[r][0], s2[0], z2[0]), a[3] = dequant_int4<T, 3>(q[r][1], s2[1], z2[1]);
            }
          } else {
            uint32_t lo[2], hi[2];
            dequant_int8<T>(q[r][0], lo);
            dequant_int8<T>(q[r][1], hi);
            a[0] = lo[0], a[1] = hi[0], a[2] = lo[1], a[3] = hi[1];
          }
#pragma unroll
          for (int j = 0; j < TT; ++j) mma<T>(acc[r][j], a, b[j]);
        }
      }
    }
  };

#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {  // fill the pipeline: a commit group a stage
    load(s0 + i, i);
    cp_async_commit();
  }
  for (int s = s0; s < s1; ++s) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of stage s landed...
    __syncthreads();              // ...and everyone's; and every warp is done with the buffer refilled next
    load(s + STAGES - 1, (s - s0 + STAGES - 1) % STAGES);
    cp_async_commit();
    compute((s - s0) % STAGES);
  }
  cp_async_wait<0>();

  // Results: straight to out, or (K split over gridDim.y blocks) fp32 partial sums, which the last block of the column
  // to finish adds in split order (the same sum whatever the order the blocks ran in) and rounds once.
  const uint16_t* row_scales = static_cast<const uint16_t*>(params);  // int8: bf16 [N]
  float* part = partial + size_t(blockIdx.y) * M * N;
#pragma unroll
  for (int r = 0; r < RW; ++r)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = n0 + row0 + 16 * r + g + 8 * (i / 2);
      if (n >= N) continue;
      const float scale = INT4 ? 1.f : __uint_as_float(uint32_t(row_scales[n]) << 16);
#pragma unroll
      for (int j = 0; j < TT; ++j) {
        const int m = 8 * j + 2 * t + i % 2;
        if (m >= M) continue;
        if (gridDim.y == 1) out[size_t(m) * N + n] = from_float<T>(acc[r][j][i] * scale);
        else part[size_t(m) * N + n] = acc[r][j][i] * scale;
      }
    }
  if (gridDim.y == 1) return;
  __shared__ int last;
  __threadfence();  // the partial sums are visible to every block before the count says so
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(locks + blockIdx.x, 1) == int(gridDim.y) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = threadIdx.x; i < M * BN; i += MMA_THREADS) {
    const int m = i / BN, n = n0 + i % BN;
    if (n >= N) continue;
    float sum = 0.f;
    for (int s = 0; s < int(gridDim.y); ++s) sum += __ldcg(partial + (size_t(s) * M + m) * N + n);
    out[size_t(m) * N + n] = from_float<T>(sum);
  }
  if (threadIdx.x == 0) locks[blockIdx.x] = 0;  // ready for the next call
}

template <int TT, typename T, bool INT4>
cudaError_t mma_launch(int64_t x, int64_t weight, int64_t params, int64_t out, int64_t partial, int64_t locks, int M,
                       int N, int K, int group_shift, int splits, int64_t stream) {
  using Tile = MmaTile<TT, INT4>;
  const auto kernel = mma_kernel<TT, T, INT4>;
  constexpr int smem = Tile::STAGES * Tile::STAGE_BYTES;  // above 48 KB, a kernel must ask for it
  const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (error != cudaSuccess) return error;
  const dim3 grid((N + Tile::BN - 1) / Tile::BN, splits);
  kernel<<<grid, MMA_THREADS, smem, reinterpret_cast<CUstream_st*>(stream)>>>(
      reinterpret_cast<const T*>(x), reinterpret_cast<const uint8_t*>(weight), reinterpret_cast<const void*>(params),
      reinterpret_cast<T*>(out), reinterpret_cast<float*>(partial), reinterpret_cast<int*>(locks), M, N, K,
      group_shift);
  return cudaGetLastError();
}

template <bool INT4, typename T>
cudaError_t mma_dispatch(int M, int64_t x, int64_t weight, int64_t params, int64_t out, int64_t partial,
                         int64_t locks, int N, int K, int group_shift, int splits, int64_t stream) {
  const auto launch = [&](auto tt) {
    return mma_launch<decltype(tt)::value, T, INT4>(x, weight, params, out, partial, locks, M, N, K, group_shift,
                                                    splits, stream);
  };
  if (M <= 8) return launch(std::integral_constant<int, 1>());
  if (M <= 16) return launch(std::integral_constant<int, 2>());
  if (M <= 32) return launch(std::integral_constant<int, 4>());
  return launch(std::integral_constant<int, 8>());
}

}  // namespace tensor_core

// x [M, K] -> out [M, N], 1 <= M <= 64, both bf16 or both fp16. int8: weight int8 [N, K], K % 16 == 0, params = scales
// bf16 [N]. int4: weight uint8 [N, K/2], params = scales_and_zeros bf16 [N, K/g, 2], g = 32 << group_shift. splits > 1
// divides K among that many blocks a column: partial fp32 [splits, M, N], and locks int32 [ceil(N / 256)], zero before
// the call and again after it. Pointers 16-byte aligned (Python's mma_into checks all this).
int mma(int64_t x, int64_t weight, int64_t params, int64_t out, int64_t partial, int64_t locks, bool int4, bool fp16,
        int64_t M, int64_t N, int64_t K, int64_t group_shift, int64_t splits, int64_t stream) {
  using namespace tensor_core;
  if (M < 1 || M > 64 || splits < 1 || splits > 65535 || (splits > 1 && (!partial || !locks))) return cudaErrorInvalidValue;
  const auto run = [&](auto int4_tag, auto dtype_tag) {
    return mma_dispatch<decltype(int4_tag)::value, decltype(dtype_tag)>(int(M), x, weight, params, out, partial, locks,
                                                                        int(N), int(K), int(group_shift), int(splits),
                                                                        stream);
  };
  if (int4) return fp16 ? run(std::true_type(), __half()) : run(std::true_type(), __nv_bfloat16());
  return fp16 ? run(std::false_type(), __half()) : run(std::false_type(), __nv_bfloat16());
}
"""

MMA_DECLARATIONS = """
int mma(int64_t x, int64_t weight, int64_t params, int64_t out, int64_t partial, int64_t locks, bool int4, bool fp16,
        int64_t M, int64_t N, int64_t K, int64_t group_shift, int64_t splits, int64_t stream);
"""
MMA_MIN_STAGES = 4  # a split of K covers at least this many pipeline stages
MMA_BLOCK_ROWS = 256  # MmaTile's BN: the weight rows a block owns


def mma_tile(tokens: int, int4: bool) -> dict:
    """MMA_SOURCE's MmaTile for this many tokens: tiles of 8 tokens, rows a block, inputs a stage, stages, and the
    bytes of shared memory a block takes."""
    tt = next(tt for tt in (1, 2, 4, 8) if tokens <= 8 * tt)
    rows, inputs, stages = MMA_BLOCK_ROWS, 128 if int4 else 64, 3 if tt == 8 else 4
    stage = rows * 64 + 8 * tt * inputs * 2 + (rows * 16 if int4 else 0)
    return {"token_tiles": tt, "rows": rows, "inputs": inputs, "stages": stages, "smem": stages * stage}


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def mma_splits(N: int, K: int, tokens: int, int4: bool, multiprocessors: int = 132) -> int:
    """How many blocks share each column's K: enough for two blocks an SM (4 warps each: two to hide the other's
    latencies), each with at least MMA_MIN_STAGES stages."""
    tile = mma_tile(tokens, int4)
    columns, stages = -(-N // tile["rows"]), -(-K // tile["inputs"])
    return max(1, min(-(-2 * multiprocessors // columns), stages // MMA_MIN_STAGES))


def mma_locks(N: int, device) -> Tensor:
    """The zeroed counters a split call of the tensor-core kernel needs, one a block's column of rows; left zero."""
    return torch.zeros(-(-N // MMA_BLOCK_ROWS), dtype=torch.int32, device=device)


def mma_into(x: Tensor, weight: Tensor, params: Tensor, out: Tensor, locks: Tensor = None, splits: int = None):
    """out [M, N] = x [M <= 64, K] @ W^T on tensor cores, in x's dtype (bf16 or fp16), on the current stream. W is
    int8 with params its scales, or int4 with params its scales_and_zeros. locks: mma_locks(N) (made here if None,
    when K is split); splits: as mma_splits chooses by default."""
    shift, M, N, K = _linear_shapes("mma", x, weight, params, out, MMA_MAX_TOKENS)
    int4 = weight.dtype == torch.uint8
    if M == 0:
        return
    splits = splits or mma_splits(N, K, M, int4, _multiprocessors(x.device))
    partial = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else None
    if splits > 1 and locks is None:
        locks = mma_locks(N, x.device)
    if splits > 1 and (locks.dtype != torch.int32 or locks.device != x.device or locks.numel() < -(-N // MMA_BLOCK_ROWS)):
        raise ValueError(f"quantize mma: locks must be mma_locks({N}) on {x.device}")
    error = _launch(kernels().mma, x.device, x.data_ptr(), weight.data_ptr(), params.data_ptr(), out.data_ptr(),
                    partial.data_ptr() if splits > 1 else 0, locks.data_ptr() if splits > 1 else 0, int4,
                    x.dtype == torch.float16, M, N, K, shift, splits)
    if error:
        raise RuntimeError(f"quantize mma launch failed with CUDA error {error}")


def _kernel_input(x: Tensor, weight: Tensor, params: Tensor):
    """x as the kernels take it (contiguous [M, K], 16-byte aligned), or None where they do not apply: off the
    kernels' device or in float32. A weight they cannot read raises (_check) rather than fall back unnoticed."""
    if x.device.type != KERNEL_DEVICE or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    _check(weight, params)
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() and x2.data_ptr() % 16 == 0 else x2.clone(memory_format=torch.contiguous_format)


def _run(into, x: Tensor, x2: Tensor, weight: Tensor, params: Tensor, *args) -> Tensor:
    out = x2.new_empty(x2.shape[0], weight.shape[0])
    into(x2, weight, params, out, *args)
    return out.reshape(*x.shape[:-1], -1)


# Custom ops, so that torch.compile traces through them (fake impls give the shapes) and CUDA graphs capture them.
# locks: the tensor-core kernel's counters (mma_locks), kept by the module; made per call when None. The kernel leaves
# them zero, as it found them.
@torch.library.custom_op("quantize::int8_linear", mutates_args=())
def int8_linear(x: Tensor, weight: Tensor, scales: Tensor, locks: Optional[Tensor] = None) -> Tensor:
    """x [..., K] -> [..., N] = x @ (weight * scales[:, None]).T in x's dtype."""
    x2 = _kernel_input(x, weight, scales)
    kernel = linear_kernel(x2.shape[0], int4=False) if x2 is not None and x2.shape[1] % 16 == 0 else "matmul"
    if kernel == "gemv":
        return _run(gemv_into, x, x2, weight, scales)
    if kernel == "mma":
        return _run(mma_into, x, x2, weight, scales, locks)
    # Scaled before the matmul: x times the raw int8 weight (up to 127) overflows fp16 once activations reach the
    # thousands, as Llama's "massive activations" do.
    return F.linear(x, dequantize_int8(weight, scales).to(x.dtype))


@torch.library.custom_op("quantize::int4_linear", mutates_args=())
def int4_linear(x: Tensor, weight: Tensor, scales_and_zeros: Tensor, locks: Optional[Tensor] = None) -> Tensor:
    """x [..., K] -> [..., N] = x @ dequantize_int4(weight, scales_and_zeros).T in x's dtype."""
    x2 = _kernel_input(x, weight, scales_and_zeros)
    if x2 is None:
        return F.linear(x, dequantize_int4(weight, scales_and_zeros).to(x.dtype))
    kernel = linear_kernel(x2.shape[0], int4=True)
    if kernel == "gemv":
        return _run(gemv_into, x, x2, weight, scales_and_zeros)
    if kernel == "mma":
        return _run(mma_into, x, x2, weight, scales_and_zeros, locks)
    w = x.new_empty(weight.shape[0], x.shape[-1])
    dequantize_int4_into(weight, scales_and_zeros, w)
    return F.linear(x, w)


@int8_linear.register_fake
def _(x, weight, scales, locks=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@int4_linear.register_fake
def _(x, weight, scales_and_zeros, locks=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# CPU: PyTorch's own weight-only kernels, which read int8 or packed int4 and multiply with fp32 sums. Their bf16 paths
# stream the weight at memory speed on an AVX-512 CPU, where their fp32 paths ran 3-8x slower than an fp32 matmul
# (2-core EPYC, torch 2.13): activations go in as bf16 where the CPU has AVX512-BF16, as fp32 elsewhere, and the
# output comes back in the activations' dtype.

CPU_DTYPE = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32
CPU_KERNELS = True  # False: the modules run the PyTorch reference on CPU too (tests compare the two)


def int8_linear_cpu(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """int8_linear on CPU, from the file's tensors as they are: nothing is repacked."""
    if torch.compiler.is_compiling():
        # Written as gpt-fast writes it, inductor recognises a weight-only int8 matmul and generates its own kernel,
        # 10-25% faster here than the aten op; run eagerly, this form would convert the whole weight every call.
        return (F.linear(x.to(CPU_DTYPE), weight.to(CPU_DTYPE)) * scales.to(CPU_DTYPE)).to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(CPU_DTYPE)
    y = torch.ops.aten._weight_int8pack_mm(x2, weight, scales.to(CPU_DTYPE))  # [tokens, N]
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def pack_int4_cpu(weight: Tensor, scales_and_zeros: Tensor) -> tuple[Tensor, Tensor]:
    """The file's int4 tensors in _weight_int4pack_mm_for_cpu's layout: codes uint8 [N', K/2] tiled for its loads (a
    second copy of the weight's bytes, not a view) and (scale, zero) [K/g, N', 2] in CPU_DTYPE, N' = N rounded up to
    the kernel's 16 rows with rows of zeros. The kernel computes w = (code - 8) * scale + zero, as dequantize_int4
    does, so the parameters carry over unchanged."""
    pad = -weight.shape[0] % 16
    codes = F.pad(unpack_int4(weight).to(torch.int32), (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return packed, F.pad(scales_and_zeros.transpose(0, 1).to(CPU_DTYPE), (0, 0, 0, pad)).contiguous()


def int4_linear_cpu(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, out_features: int) -> Tensor:
    """int4_linear on CPU, from pack_int4_cpu's tensors."""
    groupsize = 2 * packed.shape[1] // scales_and_zeros.shape[0]
    x2 = x.reshape(-1, x.shape[-1]).to(CPU_DTYPE)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, groupsize, scales_and_zeros)  # [tokens, N']
    return y[:, :out_features].reshape(*x.shape[:-1], out_features).to(x.dtype)


def on_cpu_path(t: Tensor) -> bool:
    """Whether a module with tensor t runs the CPU kernels: not while tests/cuda_emu runs the CUDA ones on the CPU."""
    return CPU_KERNELS and t.device.type == "cpu" and KERNEL_DEVICE != "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Runtime modules: swapped in for nn.Linear at load; the tensors are buffers (load_model casts only parameters).
# The file's tensors stay what the module holds and saves; a kernel that wants another layout gets it from prepare(),
# built once, after construction, loading and any move to another device, as buffers that are never saved.

class QuantizedLinear(nn.Module):
    def prepare(self):
        """Build what the kernels of the weight's device need beside the file's tensors. The tensor-core kernel reads
        the file's layout itself and needs only `locks`, zeroed counters of 4 bytes a 256 rows (mma_locks)."""
        on_kernels = self.weight.device.type == KERNEL_DEVICE
        self.register_buffer("locks", mma_locks(self.weight.shape[0], self.weight.device) if on_kernels else None,
                             persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.prepare()

    def _apply(self, fn, recurse=True):
        files = {k: v for k, v in self._buffers.items() if k not in self._non_persistent_buffers_set}
        module = super()._apply(fn, recurse)
        if any(self._buffers[k] is not v for k, v in files.items()):  # moved or cast: a no-op .to() rebuilds nothing
            self.prepare()
        return module


class Int8Linear(QuantizedLinear):
    input_multiple = 1  # a row-parallel shard may cut the inputs anywhere

    def __init__(self, weight: Tensor, scales: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # int8 [N, K]
        self.register_buffer("scales", scales)  # bf16 [N]
        self.prepare()

    in_features = property(lambda self: self.weight.shape[1])
    out_features = property(lambda self: self.weight.shape[0])

    def forward(self, x):
        if on_cpu_path(self.weight):
            return int8_linear_cpu(x, self.weight, self.scales)
        return torch.ops.quantize.int8_linear(x, self.weight, self.scales, self.locks)

    def shard(self, dim: int, ranges: list[tuple[int, int]]):
        """Keep `ranges` of the outputs (dim 0: column-parallel) or the inputs (dim 1: row-parallel); each row's scale
        goes with its row."""
        self.weight = narrow_ranges(self.weight, dim, ranges)
        if dim == 0:
            self.scales = narrow_ranges(self.scales, 0, ranges)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4Linear(QuantizedLinear):
    def __init__(self, weight: Tensor, scales_and_zeros: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # uint8 [N, K/2]
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # bf16 [N, K/groupsize, 2]
        self.prepare()

    in_features = property(lambda self: 2 * self.weight.shape[1])
    out_features = property(lambda self: self.weight.shape[0])

    def prepare(self):
        """On CPU also the file's tensors repacked for PyTorch's kernel (pack_int4_cpu): as many bytes again as the
        file's. The file's own stay for saving, sharding and moving to a GPU; loaded from a memory map they are
        clean file pages, read once by the repack, that the OS may drop."""
        super().prepare()
        packed = pack_int4_cpu(self.weight, self.scales_and_zeros) if on_cpu_path(self.weight) else (None, None)
        self.register_buffer("cpu_weight", packed[0], persistent=False)
        self.register_buffer("cpu_scales_and_zeros", packed[1], persistent=False)

    def forward(self, x):
        if on_cpu_path(self.weight):
            return int4_linear_cpu(x, self.cpu_weight, self.cpu_scales_and_zeros, self.out_features)
        return torch.ops.quantize.int4_linear(x, self.weight, self.scales_and_zeros, self.locks)

    @property
    def input_multiple(self) -> int:  # the group size: a row-parallel shard takes whole groups
        return self.in_features // self.scales_and_zeros.shape[1]

    def shard(self, dim: int, ranges: list[tuple[int, int]]):
        """Keep `ranges` of the outputs (dim 0) or the inputs (dim 1): two codes a byte, whole groups of scales."""
        if dim == 0:
            self.weight = narrow_ranges(self.weight, 0, ranges)
            self.scales_and_zeros = narrow_ranges(self.scales_and_zeros, 0, ranges)
        else:
            g = self.input_multiple
            self.weight = narrow_ranges(self.weight, 1, [(start // 2, n // 2) for start, n in ranges])
            self.scales_and_zeros = narrow_ranges(self.scales_and_zeros, 1,
                                                  [(start // g, n // g) for start, n in ranges])
        self.prepare()  # the CPU copy of the new shape

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, groupsize={self.input_multiple}"


def check_groupsize(model: nn.Module, groupsize):
    linears = linear_names(model)
    if not isinstance(groupsize, int) or isinstance(groupsize, bool) or groupsize not in GROUPSIZES:
        raise ValueError(f"int4 group size {groupsize!r}: use one of {', '.join(map(str, GROUPSIZES))}")
    for name in linears:
        K = model.get_submodule(name).in_features
        if K % groupsize:
            fits = [g for g in GROUPSIZES if all(model.get_submodule(n).in_features % g == 0 for n in linears)]
            raise ValueError(f"group size {groupsize} does not divide the {K} inputs of {name}: use "
                             f"{' or '.join(map(str, fits)) or 'int8'}")


def swap_linears(model: nn.Module, quantization: dict):
    """Replace the Linears by empty quantized modules of the right shapes (on the Linear's device, usually meta),
    ready for load_state_dict(assign=True). Called by generate.load_model for a file with a "quantization" entry."""
    mode, groupsize = quantization.get("mode"), quantization.get("groupsize")
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (expected {', '.join(MODES)} or anyprec)")
    if mode != "int8":
        check_groupsize(model, groupsize)
    for name in linear_names(model):
        N, K = model.get_submodule(name).weight.shape
        empty = functools.partial(torch.empty, device=model.get_submodule(name).weight.device)
        if mode == "int8":
            module = Int8Linear(empty(N, K, dtype=torch.int8), empty(N, dtype=torch.bfloat16))
        else:
            module = Int4Linear(empty(N, K // 2, dtype=torch.uint8), empty(N, K // groupsize, 2, dtype=torch.bfloat16))
        model.set_submodule(name, module)


# ---------------------------------------------------------------------------------------------------------------
# GPTQ (Frantar et al. 2022): quantize the columns of W one at a time and fold each column's rounding error into the
# columns not yet quantized, weighted by the inverse Hessian of the layer's squared output error, H = sum of x x^T
# over calibration inputs. That error is what the next layer sees; round-to-nearest ignores it.

def gptq(w: Tensor, H: Tensor, groupsize: int, damp: float = 0.01, act_order: bool = False, blocksize: int = 128):
    """w [N, K], H [K, K] -> (codes uint8 [N, K], scale, zero bf16 [N, K/groupsize]): quantize_int4's format."""
    W, H = w.float().clone(), H.float().clone()
    N, K = W.shape
    dead = H.diagonal() == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        # Columns by decreasing H[k, k] (the most used inputs first). Group parameters are then fixed up front from
        # the unquantized weights, so that groups stay contiguous in k and the storage is int4's.
        scale, zero = int4_params(W.reshape(N, K // groupsize, groupsize))
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
    else:
        scale = torch.empty(N, K // groupsize, dtype=torch.bfloat16, device=W.device)
        zero = torch.empty_like(scale)
        order = torch.arange(K, device=W.device)
    H.diagonal().add_(damp * H.diagonal().mean())
    # Upper Cholesky factor of H^-1: row i spreads column i's error over the columns after it (in `order`).
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    columns = order.tolist()
    blocksize = max(blocksize, groupsize)  # a multiple of groupsize: a group never straddles two blocks
    for i1 in range(0, K, blocksize):  # errors spread within the block column by column, past it in one matmul
        i2 = min(i1 + blocksize, K)
        block, errors = W[:, i1:i2], torch.empty(N, i2 - i1, device=W.device)
        for i in range(i2 - i1):
            k, g = columns[i1 + i], columns[i1 + i] // groupsize
            if not act_order and k % groupsize == 0:  # parameters from the group's weights as updated so far
                scale[:, g], zero[:, g] = int4_params(block[:, i:i + groupsize])
            q = int4_codes(block[:, i], scale[:, g], zero[:, g])
            codes[:, k] = q
            errors[:, i] = (block[:, i] - ((q.float() - 8) * scale[:, g].float() + zero[:, g].float())) / Hinv[i1 + i, i1 + i]
            block[:, i:] -= errors[:, i, None] * Hinv[i1 + i, i1 + i:i2]
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]
    return codes, scale, zero


@torch.no_grad()
def gptq_quantize(model: nn.Module, windows: Tensor, groupsize: int, damp: float = 0.01, act_order: bool = False,
                  batch_size: int = 8):
    """Quantize every Linear of `model` in place with GPTQ, in the order data flows: each layer's Hessian comes from
    the calibration windows [S, L] run through the model with every earlier layer already quantized."""
    if model.has_cache:
        raise ValueError("GPTQ runs whole calibration windows: quantize a model loaded without a KV cache")
    device = model.tok_embeddings.weight.device
    rope, mask = model.sequence_context(windows.shape[1], device)
    xs = [model.tok_embeddings(w.to(device)) for w in windows.split(batch_size)]  # the input of the next block
    # Layers that read the same input share one Hessian: wqkv, wo, (w1, w3), w2, in the order data flows.
    sublayers = [["attention.wqkv"], ["attention.wo"], ["feed_forward.w1", "feed_forward.w3"], ["feed_forward.w2"]]
    for block in tqdm(model.layers, desc="GPTQ", unit="layer"):
        for names in sublayers:
            _gptq_step(block, names, xs, lambda x: block(x, rope, None, mask), groupsize, damp, act_order)
        xs = [block(x, rope, None, mask) for x in xs]
    if "output" in linear_names(model):
        _gptq_step(model, ["output"], xs, lambda x: model.output(model.norm(x)), groupsize, damp, act_order)
    return model


class _Captured(Exception):
    """Raised once a layer's input is taken: the rest of that forward pass is not needed."""


def _gptq_step(parent: nn.Module, names: list[str], inputs: list, forward, groupsize, damp, act_order):
    """Sum x x^T over what the named Linears read while forward(input) runs up to them, then replace each by its
    GPTQ Int4Linear. The Linears share their input."""
    first = parent.get_submodule(names[0])
    H = torch.zeros(first.in_features, first.in_features, device=first.weight.device)

    def capture(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        H.addmm_(x.T, x)
        raise _Captured
    hook = first.register_forward_pre_hook(capture)
    try:
        for x in inputs:
            try:
                forward(x)
            except _Captured:
                pass
    finally:
        hook.remove()
    for name in names:
        codes, scale, zero = gptq(parent.get_submodule(name).weight, H, groupsize, damp, act_order)
        parent.set_submodule(name, Int4Linear(pack_int4(codes), torch.stack([scale, zero], dim=-1)))


# ---------------------------------------------------------------------------------------------------------------
# Whole models and files.

@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, groupsize: int = 128, windows: Tensor = None, damp: float = 0.01,
                   act_order: bool = False) -> nn.Module:
    """Quantize `model` in place on its device; int4-gptq calibrates on the token windows [S, L]."""
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "int8":
        check_groupsize(model, groupsize)
    if mode == "int4-gptq":
        return gptq_quantize(model, windows, groupsize, damp, act_order)
    for name in tqdm(linear_names(model), desc=mode, unit="layer"):
        w = model.get_submodule(name).weight
        model.set_submodule(name, Int8Linear(*quantize_int8(w)) if mode == "int8" else Int4Linear(*quantize_int4(w, groupsize)))
    return model


def output_path(checkpoint_path: Path, mode: str, groupsize: int) -> Path:
    """gpt-fast's names, beside the original: model_int8.pth, model_int4.g128.pth, model_int4-gptq.g128.pth."""
    suffix = "" if mode == "int8" else f".g{groupsize}"
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_{mode}{suffix}.pth")


def quantize_checkpoint(model: nn.Module, checkpoint_path, mode: str, groupsize: int = 128, windows: Tensor = None,
                        damp: float = 0.01, act_order: bool = False, calibration: str = None) -> Path:
    """Quantize `model`, loaded from the unquantized checkpoint_path, in place and write the quantized checkpoint
    beside it; GPTQ calibrates on the token windows [S, L] (`calibration` names where they come from)."""
    path = Path(checkpoint_path)
    original = load_state(path, unquantized=True)
    quantization = {"mode": mode} if mode == "int8" else {"mode": mode, "groupsize": groupsize}
    if mode == "int4-gptq":
        quantization.update(calibration=calibration, calibration_samples=windows.shape[0],
                            calibration_seq_len=windows.shape[1], damp=damp, act_order=act_order)
    quantize_model(model, mode, groupsize, windows, damp, act_order)
    # What stayed unquantized keeps the file's dtype; a tied output head is the embedding and is not written twice.
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    state = {k: (v.to(original[k].dtype) if k in parameters else v).cpu()
             for k, v in model.state_dict().items() if k in original or k not in parameters}
    state["quantization"] = quantization
    out = output_path(path, mode, groupsize)
    with atomic_write(out) as f:  # a file object: the archive's inner name is then fixed, and the bytes reproducible
        torch.save(state, f)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--mode", choices=MODES, default="int8")
    p.add_argument("--groupsize", type=int, choices=GROUPSIZES, default=128, help="int4: inputs sharing a scale, zero")
    p.add_argument("--calibration_file", type=Path, default=None,
                   help="GPTQ: a text file to calibrate on. Default: the TRAIN split of the standard library's source "
                        "(the tiny model's corpus), never the held-out split that eval.py measures perplexity on")
    p.add_argument("--calibration_samples", type=cli.at_least(1), default=128, help="GPTQ: windows drawn from it")
    p.add_argument("--calibration_seq_len", type=cli.at_least(2), default=512, help="GPTQ: tokens per window")
    p.add_argument("--act_order", action="store_true",
                   help="GPTQ: quantize inputs by decreasing Hessian diagonal (group parameters fixed up front)")
    p.add_argument("--damp", type=cli.positive, default=0.01, help="GPTQ: added to H's diagonal, times its mean")
    p.add_argument("--device", type=cli.device, default=None, help="where to quantize (GPTQ is much faster on a "
                   "GPU; default cuda when there is one)")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    from eval import calibration_windows
    from generate import default_device, load_model
    from tokenizer import load_tokenizer
    args = parse_args(argv)
    device = args.device or default_device()
    t0 = time.perf_counter()
    # The file's own dtype: on a CPU its tensors are then the memory map itself, read one layer at a time. GPTQ runs
    # the model on its calibration windows, in float32 on a CPU (bf16 matmuls are slow on most).
    dtype = load_state(args.checkpoint_path, unquantized=True)["tok_embeddings.weight"].dtype
    gptq_on_cpu = args.mode == "int4-gptq" and torch.device(device).type == "cpu"
    model = load_model(args.checkpoint_path, device, torch.float32 if gptq_on_cpu else dtype)
    windows = None
    if args.mode == "int4-gptq":
        if args.calibration_seq_len > model.config.block_size:
            raise ValueError(f"--calibration_seq_len {args.calibration_seq_len} exceeds the model's block_size "
                             f"{model.config.block_size}")
        windows = calibration_windows(load_tokenizer(args.checkpoint_path.parent), args.calibration_samples,
                                      args.calibration_seq_len, args.calibration_file)
    calibration = args.calibration_file.name if args.calibration_file else "stdlib train split"
    out = quantize_checkpoint(model, args.checkpoint_path, args.mode, args.groupsize, windows, args.damp,
                              args.act_order, calibration)
    rows = [("wrote", str(out)), ("size", f"{out.stat().st_size / 1e6:.1f} MB (from "
                                         f"{args.checkpoint_path.stat().st_size / 1e6:.1f} MB)"),
            ("time", f"{time.perf_counter() - t0:.1f} s")]
    print("\n".join(f"{name:>6}: {value}" for name, value in rows))
    return out


if __name__ == "__main__":
    cli.run(main)
