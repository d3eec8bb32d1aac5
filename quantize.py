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
scales_and_zeros.shape[1]. The kernels take contiguous tensors (a shard copied to the device is).

On CUDA (bf16 or fp16 activations) 1..8 tokens run the GEMV kernels below; more tokens dequantize the weight to the
activation dtype and call the matmul. Elsewhere the PyTorch path computes the same function.
"""
import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

MODES = ("int8", "int4", "int4-gptq")
GROUPSIZES = (32, 64, 128, 256)
GEMV_MAX_TOKENS = 8  # up to this many tokens (batch x positions) a call runs the GEMV kernel

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
# loads 16 bytes of a row at a time (a warp: 512 contiguous bytes), several loads in flight, dequantizes in registers
# and accumulates in fp32; one warp-shuffle reduction per row at the end.

CUDA_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <type_traits>

namespace {

constexpr int WARPS = 8;   // per block
constexpr int ROWS = 2;    // weight rows per warp: each activation load serves ROWS rows
constexpr int UNROLL = 2;  // 16-byte loads per row that a lane issues before it uses any: ROWS * UNROLL in flight

// Weights are read exactly once: keep them out of L1, which then holds the activations every warp re-reads.
__device__ __forceinline__ uint4 load_weights(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// bf16 is the top half of an fp32: widening is a shift or a mask.
__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v); else return __float2bfloat16_rn(v);
}

// Eight activations (16 bytes) to fp32.
template <typename T>
__device__ __forceinline__ void load_x8(const T* p, float f[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  for (int i = 0; i < 8; ++i) f[i] = to_float(reinterpret_cast<const T*>(&v)[i]);
}

// Integers to fp32 without conversion instructions: a small integer u placed in the mantissa of 2^23 (0x4B000000)
// reads as 2^23 + u, and one subtraction leaves u exactly.
// int8: flip the sign bit (b + 128, as a byte), permute that byte into the mantissa, subtract 2^23 + 128.
__device__ __forceinline__ void dequant_int8x4(uint32_t w, float out[4]) {
  const uint32_t u = w ^ 0x80808080u;
  for (int j = 0; j < 4; ++j) out[j] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7650 + j)) - 8388736.f;
}

// int4: nibble j of a half-word masked in place is q * 16^j, so the float is 2^23 + q * 16^j; subtracting
// 2^23 + 8 * 16^j leaves (q - 8) * 16^j, and scale_j = scale / 16^j cancels the 16^j inside one FMA with the zero:
// w = (q - 8) * scale + zero with a single rounding, bit for bit what dequantize_int4 computes.
__device__ __forceinline__ void dequant_int4x8(uint32_t w, const float scale_j[4], float zero, float out[8]) {
  for (int j = 0; j < 4; ++j) {
    const uint32_t mask = 0xFu << (4 * j);
    const float bias = 8388608.f + 8.f * float(1 << (4 * j));
    out[j] = fmaf(__uint_as_float((w & mask) | 0x4B000000u) - bias, scale_j[j], zero);
    out[j + 4] = fmaf(__uint_as_float(((w >> 16) & mask) | 0x4B000000u) - bias, scale_j[j], zero);
  }
}

// out[m, n] = sum_k x[m, k] * w[n, k] for x [M, K], out [M, N]. Each warp owns ROWS rows of the weight; lane l reads
// the row's 16-byte chunks l, l + 32, ... (a warp reads 512 contiguous bytes) and every weight byte is read once.
// INT4: a chunk is 32 weights of one group (the group size is 32 << group_shift), params holds a 32-bit (scale, zero)
// pair per group. int8: a chunk is 16 weights, params holds one bf16 scale per row, applied to the finished sum.
template <int M, typename T, bool INT4>
__global__ void __launch_bounds__(WARPS * 32) gemv_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ weight, const void* __restrict__ params,
    T* __restrict__ out, int N, int K, int group_shift) {
  constexpr int PER_CHUNK = INT4 ? 32 : 16;
  const int lane = threadIdx.x % 32, row0 = (blockIdx.x * WARPS + threadIdx.x / 32) * ROWS;
  if (row0 >= N) return;  // whole warps only
  const int chunks = K / PER_CHUNK, groups = chunks >> group_shift;
  const uint8_t* rows[ROWS];
  const uint32_t* row_params[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    const int n = min(row0 + r, N - 1);  // a row past N is computed from the last row and never stored
    rows[r] = weight + size_t(n) * (INT4 ? K / 2 : K);
    row_params[r] = static_cast<const uint32_t*>(params) + size_t(n) * groups;
  }
  float acc[ROWS][M] = {};
  for (int c0 = lane; c0 < chunks; c0 += 32 * UNROLL) {
    uint4 q[UNROLL][ROWS];
    uint32_t sz[UNROLL][ROWS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int c = c0 + 32 * u;
        q[u][r] = c < chunks ? load_weights(rows[r] + size_t(c) * 16) : make_uint4(0, 0, 0, 0);
        if (INT4) sz[u][r] = c < chunks ? __ldg(row_params[r] + (c >> group_shift)) : 0u;
      }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = c0 + 32 * u;
      if (c >= chunks) break;
      float scale_j[ROWS][4], zero[ROWS];
      for (int r = 0; r < ROWS && INT4; ++r) {
        zero[r] = bf16_hi(sz[u][r]);
        for (int j = 0; j < 4; ++j) scale_j[r][j] = bf16_lo(sz[u][r]) * (1.f / float(1 << (4 * j)));
      }
#pragma unroll
      for (int h = 0; h < PER_CHUNK / 8; ++h) {  // 8 weights at a time
        float xf[M][8];
        for (int m = 0; m < M; ++m) load_x8(x + size_t(m) * K + c * PER_CHUNK + h * 8, xf[m]);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          float w[8];
          if constexpr (INT4) {
            dequant_int4x8(word(q[u][r], h), scale_j[r], zero[r], w);
          } else {
            dequant_int8x4(word(q[u][r], 2 * h), w);
            dequant_int8x4(word(q[u][r], 2 * h + 1), w + 4);
          }
          for (int m = 0; m < M; ++m)
            for (int i = 0; i < 8; ++i) acc[r][m] = fmaf(w[i], xf[m][i], acc[r][m]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
    for (int m = 0; m < M; ++m)
      for (int offset = 16; offset > 0; offset /= 2) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], offset);
  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (row0 + r >= N) break;
    const float scale = INT4 ? 1.f : bf16_lo(static_cast<const uint16_t*>(params)[row0 + r]);
    for (int m = 0; m < M; ++m) out[size_t(m) * N + row0 + r] = from_float<T>(acc[r][m] * scale);
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
void with_dtype(const at::Tensor& t, F f) {
  if (t.scalar_type() == at::kBFloat16) f(__nv_bfloat16());
  else if (t.scalar_type() == at::kHalf) f(__half());
  else TORCH_CHECK(false, "quantize kernels take bfloat16 or float16 activations, not ", t.scalar_type());
}

void check(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == dtype, name, ": expected a contiguous CUDA ",
              dtype, " tensor, got ", t.scalar_type(), t.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, ": not 16-byte aligned");
}

int group_shift(int64_t K, int64_t groups) {  // log2(groupsize / 32)
  const int64_t groupsize = K / groups;
  TORCH_CHECK(groups > 0 && K % groups == 0 && groupsize >= 32 && (groupsize & (groupsize - 1)) == 0,
              "int4 group size must be a power of two >= 32, got K ", K, " and ", groups, " groups");
  int shift = 0;
  while ((32 << shift) < groupsize) ++shift;
  return shift;
}

}  // namespace

// x [M <= 8, K] -> out [M, N] in x's dtype. int8: weight int8 [N, K], params = scales bf16 [N]. int4: weight uint8
// [N, K/2], params = scales_and_zeros bf16 [N, K/g, 2].
void gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& params, at::Tensor out) {
  const bool int4 = weight.scalar_type() == at::kByte;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check(x, x.scalar_type(), "x"), check(weight, int4 ? at::kByte : at::kChar, "weight");
  check(params, at::kBFloat16, "params"), check(out, x.scalar_type(), "out");
  TORCH_CHECK(M >= 1 && M <= 8 && K % 16 == 0 && weight.size(1) * (int4 ? 2 : 1) == K && params.size(0) == N &&
              out.size(0) == M && out.size(1) == N, "gemv: shapes do not match");
  const int shift = int4 ? group_shift(K, params.size(1)) : 0;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid((N + WARPS * ROWS - 1) / (WARPS * ROWS));
  with_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    with_batch(M, [&](auto m) {
      const auto kernel = int4 ? gemv_kernel<decltype(m)::value, T, true> : gemv_kernel<decltype(m)::value, T, false>;
      kernel<<<grid, WARPS * 32, 0, stream>>>(static_cast<const T*>(x.data_ptr()),
                                              static_cast<const uint8_t*>(weight.data_ptr()), params.data_ptr(),
                                              static_cast<T*>(out.data_ptr()), N, K, shift);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// weight uint8 [N, K/2], scales_and_zeros bf16 [N, K/g, 2] -> out [N, K] (bf16 or fp16).
void int4_dequantize(const at::Tensor& weight, const at::Tensor& scales_and_zeros, at::Tensor out) {
  const int64_t N = weight.size(0), K = weight.size(1) * 2;
  check(weight, at::kByte, "weight"), check(scales_and_zeros, at::kBFloat16, "scales_and_zeros");
  check(out, out.scalar_type(), "out");
  TORCH_CHECK(scales_and_zeros.size(0) == N && out.size(0) == N && out.size(1) == K, "int4_dequantize: shapes");
  const int shift = group_shift(K, scales_and_zeros.size(1)) + 2;  // in 8-weight words
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t words = N * K / 8;
  with_dtype(out, [&](auto tag) {
    using T = decltype(tag);
    int4_dequantize_kernel<T><<<int(std::min<int64_t>((words + 255) / 256, 65536)), 256, 0,
                                c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const uint32_t*>(weight.data_ptr()), static_cast<const uint32_t*>(scales_and_zeros.data_ptr()),
        static_cast<T*>(out.data_ptr()), words, int(K / 8), int(scales_and_zeros.size(1)), shift);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""

CPP_SOURCE = """
void gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& params, at::Tensor out);
void int4_dequantize(const at::Tensor& weight, const at::Tensor& scales_and_zeros, at::Tensor out);
"""


@functools.cache
def kernels():
    """The compiled kernels: built on first CUDA use (a minute), then loaded from torch's extension cache."""
    from torch.utils.cpp_extension import load_inline
    return load_inline("quantize_kernels", CPP_SOURCE, CUDA_SOURCE, functions=["gemv", "int4_dequantize"],
                       extra_cuda_cflags=["-O3"])


def _kernel_input(x: Tensor, weight: Tensor, params: Tensor):
    """x as the kernels take it (contiguous [M, K], 16-byte aligned), or None where they do not apply: off CUDA, in
    float32, or for a weight that is not contiguous and aligned."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and params.dtype == torch.bfloat16
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (weight, params))):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() and x2.data_ptr() % 16 == 0 else x2.clone(memory_format=torch.contiguous_format)


# Custom ops, so that torch.compile traces through them (fake impls give the shapes) and CUDA graphs capture them.
@torch.library.custom_op("quantize::int8_linear", mutates_args=())
def int8_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x [..., K] -> [..., N] = x @ (weight * scales[:, None]).T in x's dtype."""
    x2 = _kernel_input(x, weight, scales)
    if x2 is not None and 0 < x2.shape[0] <= GEMV_MAX_TOKENS and x2.shape[1] % 16 == 0:
        out = x2.new_empty(x2.shape[0], weight.shape[0])
        kernels().gemv(x2, weight, scales, out)
        return out.reshape(*x.shape[:-1], -1)
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)  # int8 -> bf16 is exact; the scale is per column


@torch.library.custom_op("quantize::int4_linear", mutates_args=())
def int4_linear(x: Tensor, weight: Tensor, scales_and_zeros: Tensor) -> Tensor:
    """x [..., K] -> [..., N] = x @ dequantize_int4(weight, scales_and_zeros).T in x's dtype."""
    x2 = _kernel_input(x, weight, scales_and_zeros)
    if x2 is None:
        return F.linear(x, dequantize_int4(weight, scales_and_zeros).to(x.dtype))
    if 0 < x2.shape[0] <= GEMV_MAX_TOKENS:
        out = x2.new_empty(x2.shape[0], weight.shape[0])
        kernels().gemv(x2, weight, scales_and_zeros, out)
        return out.reshape(*x.shape[:-1], -1)
    w = x.new_empty(weight.shape[0], x.shape[-1])
    kernels().int4_dequantize(weight, scales_and_zeros, w)
    return F.linear(x, w)


@int8_linear.register_fake
def _(x, weight, scales):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@int4_linear.register_fake
def _(x, weight, scales_and_zeros):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Runtime modules: swapped in for nn.Linear at load; the tensors are buffers (load_model casts only parameters).

class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, scales: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # int8 [N, K]
        self.register_buffer("scales", scales)  # bf16 [N]

    def forward(self, x):
        return torch.ops.quantize.int8_linear(x, self.weight, self.scales)

    def extra_repr(self):
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


class Int4Linear(nn.Module):
    def __init__(self, weight: Tensor, scales_and_zeros: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # uint8 [N, K/2]
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # bf16 [N, K/groupsize, 2]

    def forward(self, x):
        return torch.ops.quantize.int4_linear(x, self.weight, self.scales_and_zeros)

    def extra_repr(self):
        K = 2 * self.weight.shape[1]
        return f"in_features={K}, out_features={self.weight.shape[0]}, groupsize={K // self.scales_and_zeros.shape[1]}"


def linear_names(model: nn.Module) -> list[str]:
    """The layers quantization replaces: every nn.Linear but an output head that is the embedding table."""
    tied = getattr(model, "config", None) is not None and model.config.tie_embeddings
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not (tied and name == "output")]


def check_groupsize(model: nn.Module, groupsize: int):
    for name in linear_names(model):
        K = model.get_submodule(name).in_features
        if K % groupsize:
            fits = [g for g in GROUPSIZES if all(model.get_submodule(n).in_features % g == 0 for n in linear_names(model))]
            raise ValueError(f"--groupsize {groupsize} does not divide the {K} inputs of {name}: use "
                             f"{' or '.join(map(str, fits)) or 'int8'}")


def swap_linears(model: nn.Module, quantization: dict):
    """Replace the Linears by empty quantized modules of the right shapes (on the Linear's device, usually meta),
    ready for load_state_dict(assign=True). Called by generate.load_model for a file with a "quantization" entry."""
    mode, groupsize = quantization["mode"], quantization.get("groupsize")
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
    from model import causal_mask, rope_table
    from tqdm import tqdm
    c, device = model.config, model.tok_embeddings.weight.device
    L = windows.shape[1]
    rope = rope_table(L, c.head_dim, c.rope_base, c.rope_scaling, device)[None]
    mask = None  # causal, as Transformer.hidden without a cache
    if c.sliding_window is not None and L > c.sliding_window:
        mask = causal_mask(torch.arange(L, device=device)[None], L, c.sliding_window)
    xs = [model.tok_embeddings(w.to(device)) for w in windows.split(batch_size)]  # the input of the next block
    # Layers that read the same input share one Hessian: wqkv, wo, (w1, w3), w2, in the order data flows.
    sublayers = [["attention.wqkv"], ["attention.wo"], ["feed_forward.w1", "feed_forward.w3"], ["feed_forward.w2"]]
    for block in tqdm(model.layers, desc="GPTQ", unit="layer"):
        cache, block.attention.kv_cache = block.attention.kv_cache, None  # whole windows, as without setup_caches
        for names in sublayers:
            _gptq_step(block, names, xs, lambda x: block(x, rope, None, mask), groupsize, damp, act_order)
        xs = [block(x, rope, None, mask) for x in xs]
        block.attention.kv_cache = cache
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
    from tqdm import tqdm
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
    """gpt-fast's names: model_int8.pth, model_int4.g128.pth, model_int4-gptq.g128.pth."""
    suffix = "" if mode == "int8" else f".g{groupsize}"
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_{mode}{suffix}.pth")


def quantize_checkpoint(checkpoint_path, mode: str, groupsize: int = 128, device="cpu", calibration_file=None,
                        calibration_samples: int = 128, calibration_seq_len: int = 512, damp: float = 0.01,
                        act_order: bool = False) -> Path:
    """Write the quantized checkpoint beside the original (to a temporary name, renamed when complete)."""
    from generate import load_model
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: give --checkpoint_path DIR/model.pth")
    original = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if "quantization" in original:
        raise ValueError(f"{path} is already quantized ({original['quantization'].get('mode')}): "
                         f"quantize the original bf16 model.pth")
    # The file's own dtype: on a CPU its tensors are then the memory map itself, read one layer at a time. GPTQ runs
    # the model on its calibration windows, in float32 on a CPU (bf16 matmuls are slow on most).
    dtype = original["tok_embeddings.weight"].dtype
    if mode == "int4-gptq" and torch.device(device).type == "cpu":
        dtype = torch.float32
    model = load_model(path, device, dtype)
    quantization = {"mode": mode}
    windows = None
    if mode != "int8":
        check_groupsize(model, groupsize)
        quantization["groupsize"] = groupsize
    if mode == "int4-gptq":
        from eval import calibration_windows
        from tokenizer import load_tokenizer
        if calibration_seq_len > model.config.block_size:
            raise ValueError(f"--calibration_seq_len {calibration_seq_len} exceeds the model's block_size "
                             f"{model.config.block_size}")
        windows = calibration_windows(load_tokenizer(path.parent), calibration_samples, calibration_seq_len,
                                      calibration_file)
        quantization.update(calibration=Path(calibration_file).name if calibration_file else "stdlib train split",
                            calibration_samples=calibration_samples, calibration_seq_len=calibration_seq_len,
                            damp=damp, act_order=act_order)
    quantize_model(model, mode, groupsize, windows, damp, act_order)
    # What stayed unquantized keeps the file's dtype; a tied output head is the embedding and is not written twice.
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    state = {k: (v.to(original[k].dtype) if k in parameters else v).cpu()
             for k, v in model.state_dict().items() if k in original or k not in parameters}
    state["quantization"] = quantization
    out = output_path(path, mode, groupsize)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # a file object: the archive's inner name is then fixed, and the bytes reproducible
            torch.save(state, f)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv=None):
    from generate import DEFAULT_CHECKPOINT, default_device
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--mode", choices=MODES, default="int8")
    p.add_argument("--groupsize", type=int, choices=GROUPSIZES, default=128, help="int4: inputs sharing a scale and zero")
    p.add_argument("--calibration_file", type=Path, default=None,
                   help="GPTQ: a text file to calibrate on. Default: the TRAIN split of the standard library's source "
                        "(the tiny model's corpus), never the held-out split that eval.py measures perplexity on")
    p.add_argument("--calibration_samples", type=int, default=128, help="GPTQ: windows drawn from the text")
    p.add_argument("--calibration_seq_len", type=int, default=512, help="GPTQ: tokens per window")
    p.add_argument("--act_order", action="store_true",
                   help="GPTQ: quantize inputs by decreasing Hessian diagonal (group parameters fixed up front)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: added to H's diagonal, times its mean")
    p.add_argument("--device", default=default_device(), help="where to quantize (GPTQ is much faster on a GPU)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = quantize_checkpoint(args.checkpoint_path, args.mode, args.groupsize, args.device, args.calibration_file,
                              args.calibration_samples, args.calibration_seq_len, args.damp, args.act_order)
    rows = [("wrote", str(out)), ("size", f"{out.stat().st_size / 1e6:.1f} MB (from "
                                         f"{args.checkpoint_path.stat().st_size / 1e6:.1f} MB)"),
            ("time", f"{time.perf_counter() - t0:.1f} s")]
    print("\n".join(f"{name:>6}: {value}" for name, value in rows))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
