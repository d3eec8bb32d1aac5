"""The CUDA emulator (tests/cuda_emu) itself: its conversions against independent ones, its warp collectives, barriers
and shared memory against what CUDA specifies, the errors it claims to catch, and (the mutation test) that the kernel
tests fail on quantize.py's and anyprec.py's kernels with a bug put in."""
import random
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import anyprec
import cuda_emu
import quantize
import test_anyprec_kernels
import test_quantize_kernels
from cuda_emu import EmulatorError

# ---------------------------------------------------------------------------------------------------------------
# Conversions.

CONVERSIONS = r"""
#include <numeric>
#include <thread>

// bits in -> bits out, n elements: 16-bit (half or bf16) to float, or float to 16-bit.
int widen(int64_t in, int64_t out, int64_t n, bool bf16) {
  for (int64_t i = 0; i < n; i++) {
    const unsigned short h = reinterpret_cast<const unsigned short*>(in)[i];
    reinterpret_cast<float*>(out)[i] = bf16 ? __bfloat162float(__ushort_as_bfloat16(h))
                                             : __half2float(__ushort_as_half(h));
  }
  return 0;
}
int narrow(int64_t in, int64_t out, int64_t n, bool bf16) {
  for (int64_t i = 0; i < n; i++) {
    const float f = reinterpret_cast<const float*>(in)[i];
    reinterpret_cast<unsigned short*>(out)[i] = bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(f))
                                                      : __half_as_ushort(__float2half_rn(f));
  }
  return 0;
}

// Every float of both signs with a biased exponent in [first, last], rounded by __float2half_rn and by the compiler's
// _Float16 (F16C's vcvtps2ph here): how many differ (a NaN for a NaN is no difference). On every core.
int64_t half_rounding_errors(int64_t first, int64_t last) {
  const uint64_t begin = uint64_t(first) << 23, end = uint64_t(last + 1) << 23;
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<int64_t> errors(threads);
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; t++)
    pool.emplace_back([&, t] {
      int64_t count = 0;
      for (uint64_t i = begin + t; i < end; i += threads)
        for (unsigned sign : {0u, 0x80000000u}) {
          const float f = __uint_as_float(uint32_t(i) | sign);
          const _Float16 reference = f;
          unsigned short expected;
          memcpy(&expected, &reference, 2);
          const unsigned short got = __half_as_ushort(__float2half_rn(f));
          count += (expected & 0x7fff) > 0x7c00 ? (got & 0x7fff) <= 0x7c00 : got != expected;
        }
      errors[t] = count;
    });
  for (auto& t : pool) t.join();
  return std::accumulate(errors.begin(), errors.end(), int64_t(0));
}
"""
CONVERSION_DECLARATIONS = """
int widen(int64_t in, int64_t out, int64_t n, bool bf16);
int narrow(int64_t in, int64_t out, int64_t n, bool bf16);
int64_t half_rounding_errors(int64_t first, int64_t last);
"""


@pytest.fixture(scope="module")
def conversions():
    return cuda_emu.load_inline("conversions", CONVERSION_DECLARATIONS, CONVERSIONS,
                                ["widen", "narrow", "half_rounding_errors"])


def widen(conversions, bits: torch.Tensor, bf16: bool) -> torch.Tensor:
    out = torch.empty(bits.shape, dtype=torch.float32)
    conversions.widen(bits.data_ptr(), out.data_ptr(), bits.numel(), bf16)
    return out


def narrow(conversions, floats: torch.Tensor, bf16: bool) -> torch.Tensor:
    out = torch.empty(floats.shape, dtype=torch.int16)
    conversions.narrow(floats.data_ptr(), out.data_ptr(), floats.numel(), bf16)
    return out


@pytest.mark.parametrize("bf16", [False, True], ids=["half", "bf16"])
def test_every_16_bit_value_widens_exactly(conversions, bf16):
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    reference = bits.view(torch.bfloat16 if bf16 else torch.float16).float()
    assert torch.equal(widen(conversions, bits, bf16).view(torch.int32), reference.view(torch.int32))


def test_float_to_half_rounds_to_nearest_even(conversions):
    """Exhaustive where rounding happens: every float of both signs from 2^-26 (below it, and at it, ties go to 0) to
    2^17 (above 65520 everything is infinity), and NaNs and infinities (exponent 255): 0.77 billion floats against the
    compiler's conversion. Elsewhere, where the exponent alone decides, a stride against torch's."""
    assert conversions.half_rounding_errors(101, 143) == 0
    assert conversions.half_rounding_errors(255, 255) == 0
    floats = torch.arange(0, 2**32, 4099, dtype=torch.int64).to(torch.int32).view(torch.float32)
    expected = floats.half().view(torch.int16)
    got = narrow(conversions, floats, False)
    nan = floats.isnan()
    assert torch.equal(got[~nan], expected[~nan]) and (got[nan] == 0x7fff).all()  # CUDA's canonical NaN


def test_float_to_bf16_rounds_to_nearest_even(conversions):
    """A stride over all floats that meets every low half-word (4099 is odd), the ties, the largest finite bf16 and
    its overflow, against torch's conversion."""
    stride = torch.arange(0, 2**32, 4099, dtype=torch.int64)
    ties = torch.arange(0, 2**16, dtype=torch.int64) << 16 | 0x8000
    edges = torch.tensor([0x7f7f7fff, 0x7f7f8000, 0x7f7fffff, 0x7f800000, 0x00000001, 0x00008000, 0x80008000])
    floats = torch.cat([stride, ties, edges, edges | 2**31]).to(torch.int32).view(torch.float32)
    expected = floats.bfloat16().view(torch.int16)
    got = narrow(conversions, floats, True)
    nan = floats.isnan()
    assert torch.equal(got[~nan], expected[~nan]) and (got[nan] == 0x7fff).all()


# ---------------------------------------------------------------------------------------------------------------
# What kernels see: collectives, barriers, shared memory, the grid. One entry point runs kernel `which`.

KERNELS = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>

// Eight results a thread: each intrinsic's value, in a 64-thread block (two warps).
__global__ void collectives(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + 8 * (blockIdx.x * blockDim.x + t);
  o[0] = __shfl_sync(0xffffffffu, 10 * t, lane + 5);        // source lane (lane + 5) mod 32
  o[1] = __shfl_up_sync(0xffffffffu, 10 * t, 3);            // lanes 0-2 keep their own
  o[2] = __shfl_down_sync(0xffffffffu, 10 * t, 3, 16);      // in halves of 16: lanes 13-15 and 29-31 keep their own
  o[3] = __shfl_xor_sync(0xffffffffu, 10 * t, 5, 8);        // in groups of 8
  o[4] = __ballot_sync(0xffffffffu, t % 3 == 0);
  o[5] = __any_sync(0xffffffffu, t == 40) | __all_sync(0xffffffffu, t < 60) << 1;
  o[6] = __shfl_xor_sync(lane < 16 ? 0x0000ffffu : 0xffff0000u, t, 1);  // two half-warps, each its own mask
  __syncwarp();
  o[7] = __float_as_int(__shfl_down_sync(0xffffffffu, 0.5f * t, 1));
}

// A block's sum: warp shuffles, then shared memory across a barrier.
__global__ void block_sum(const float* x, float* out) {
  __shared__ float partial[32];
  float v = x[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int w = 0; w < blockDim.x / 32; w++) sum += partial[w];
    out[blockIdx.x] = sum;
  }
}

// Shared memory read before any write (static, then dynamic), then the dynamic buffer written and read reversed.
__global__ void fresh_shared(float* out) {
  __shared__ float fixed[64];
  extern __shared__ float buffer[];
  const int t = threadIdx.x, n = blockDim.x;
  out[t] = fixed[t];
  out[n + t] = buffer[t];
  __syncthreads();
  buffer[t] = t;
  __syncthreads();
  out[2 * n + t] = buffer[n - 1 - t];
}

// Every thread of a 3-D grid of 3-D blocks marks its slot once; a global counter counts them all.
__global__ void grid_3d(int* marks, int* count) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  marks[block * blockDim.x * blockDim.y * blockDim.z + thread] += 1;
  atomicAdd(count, 1);
}

// Mistakes, one a kernel.
__global__ void deadlock(int*) {  // thread 0 waits at the block barrier, the rest of its warp for it at __syncwarp
  if (threadIdx.x == 0) __syncthreads();
  else __syncwarp();
}
__global__ void exited_lanes(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f * threadIdx.x, 1);
}
__global__ void read_outside_mask(int* out) {  // lanes 0-15 read lane 20
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, threadIdx.x, 20);
}
__global__ void misaligned_ldg(const float* p, float* out) {
  out[0] = __ldg(reinterpret_cast<const uint4*>(p + 2)).x;  // 8 bytes past a 16-byte boundary
}
__global__ void misaligned_store(float* p) { *reinterpret_cast<uint4*>(p + 2) = make_uint4(1, 2, 3, 4); }
__global__ void unguarded_ptx(unsigned* out) {
  unsigned lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  out[threadIdx.x] = lane;
}
__global__ void guarded_ptx(unsigned* out) {
  unsigned lane;
#if defined(__CUDA_ARCH__)
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
#else
  lane = threadIdx.x % 32;
#endif
  out[threadIdx.x] = lane;
}

int run(int64_t which, int64_t a, int64_t b, int64_t blocks, int64_t threads, int64_t smem) {
  float* f = reinterpret_cast<float*>(a);
  int* i = reinterpret_cast<int*>(a);
  switch (which) {
    case 0: collectives<<<blocks, threads>>>(i); break;
    case 1: block_sum<<<blocks, threads>>>(f, reinterpret_cast<float*>(b)); break;
    case 2: fresh_shared<<<blocks, threads, smem>>>(f); break;
    case 3: grid_3d<<<dim3(blocks, 2, 3), dim3(threads, 2, 2)>>>(i, reinterpret_cast<int*>(b)); break;
    case 4: deadlock<<<blocks, threads>>>(i); break;
    case 5: exited_lanes<<<blocks, threads>>>(f); break;
    case 6: read_outside_mask<<<blocks, threads>>>(i); break;
    case 7: misaligned_ldg<<<blocks, threads>>>(f, reinterpret_cast<float*>(b)); break;
    case 8: misaligned_store<<<blocks, threads>>>(f); break;
    case 9: unguarded_ptx<<<blocks, threads>>>(reinterpret_cast<unsigned*>(a)); break;
    case 10: guarded_ptx<<<blocks, threads>>>(reinterpret_cast<unsigned*>(a)); break;
  }
  return cudaGetLastError();
}
"""
RUN = ["int run(int64_t which, int64_t a, int64_t b, int64_t blocks, int64_t threads, int64_t smem);"]


@pytest.fixture(scope="module")
def kernels():
    return cuda_emu.load_inline("emulator_tests", RUN, KERNELS, ["run"])


@pytest.fixture(params=cuda_emu.SCHEDULES)
def schedule(request):
    with cuda_emu.schedule(request.param):
        yield request.param


def expected_collectives(blocks):
    rows = []
    for b in range(blocks):
        for t in range(64):
            lane, warp = t % 32, 32 * (t // 32)
            ballot = sum(1 << (u - warp) for u in range(warp, warp + 32) if u % 3 == 0)
            rows.append([10 * (warp + (lane + 5) % 32),
                         10 * (t - 3 if lane >= 3 else t),
                         10 * (t + 3 if lane % 16 < 13 else t),
                         10 * (warp + (lane ^ 5)),
                         ballot - 2**32 if ballot >= 2**31 else ballot,
                         (warp == 32) | (warp == 0) << 1,
                         t ^ 1,
                         torch.tensor(0.5 * (t + 1 if lane < 31 else t)).view(torch.int32).item()])
    return torch.tensor(rows, dtype=torch.int32)


def test_collectives_give_each_lane_what_cuda_specifies(kernels, schedule):
    out = torch.zeros(3 * 64, 8, dtype=torch.int32)
    kernels.run(0, out.data_ptr(), 0, 3, 64, 0)
    assert torch.equal(out, expected_collectives(3))


def test_block_barrier_and_shared_memory_sum_each_block(kernels, schedule):
    x = torch.randn(5, 256)
    out = torch.full((5,), float("nan"))
    kernels.run(1, x.data_ptr(), out.data_ptr(), 5, 256, 0)
    torch.testing.assert_close(out, x.sum(1))


def test_shared_memory_starts_as_nan_in_every_block(kernels, schedule):
    out = torch.zeros(3, 64)
    kernels.run(2, out.data_ptr(), 0, 1, 64, 64 * 4)
    assert out[:2].isnan().all()
    assert torch.equal(out[2], torch.arange(63, -1, -1, dtype=torch.float32))


def test_every_thread_of_a_3d_grid_runs_once(kernels):
    """Blocks spread over OS threads; each thread's indices are its own."""
    marks, count = torch.zeros(7 * 2 * 3 * 48, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    kernels.run(3, marks.data_ptr(), count.data_ptr(), 7, 12, 0)
    assert (marks == 1).all() and count.item() == marks.numel()


def test_fibers_on_ucontext_compute_the_same():
    """Off x86-64 fibers switch with ucontext: the same kernels, the same results."""
    slow = cuda_emu.load_inline("emulator_tests", RUN, KERNELS, ["run"], flags=["-DCUDA_EMU_UCONTEXT", "-O0"])
    out = torch.zeros(2 * 64, 8, dtype=torch.int32)
    slow.run(0, out.data_ptr(), 0, 2, 64, 0)
    assert torch.equal(out, expected_collectives(2))


MISTAKES = {  # which kernel, block size, and what the error must say
    "deadlock": (4, 64, r"^deadlock, block \(0,0,0\): deadlock: 1 thread .* wait at __syncthreads \(line \d+\); 31 "
                        r"threads .* wait at __syncwarp"),
    "exited lanes": (5, 32, r"^exited_lanes, block \(0,0,0\), thread \(\d+,0,0\): .*(names lanes [\d, -]+, which have "
                            r"exited|exits while lanes [\d, -]+ wait for it at __shfl_xor_sync)"),
    "read outside the mask": (6, 32, r"^read_outside_mask, .*: __shfl_sync \(line \d+\): lane \d+ reads lane 20, "
                                     r"which the mask 0x0000ffff leaves out"),
    "misaligned __ldg": (7, 32, r"^misaligned_ldg, .*: __ldg \(line \d+\) of 16 bytes at 0x[0-9a-f]+, which is not "
                                r"16-byte aligned"),
    "misaligned store": (8, 32, r"^misaligned_store, .*: store of '(struct )?uint4' \(line \d+\) at 0x[0-9a-f]+, "
                                r"which is not 16-byte aligned"),
    "inline PTX": (9, 32, r"^unguarded_ptx, .*: inline assembly \(line \d+\) cannot run on the CPU: "
                          r"asm\(\"mov.u32 %0, %%laneid;\".*guard it with #if defined\(__CUDA_ARCH__\)"),
    "bad launch": (0, 2048, r"^collectives: invalid launch configuration: grid \(1,1,1\), block \(2048,1,1\)"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistakes_raise_naming_the_kernel(kernels, schedule, mistake):
    which, threads, message = MISTAKES[mistake]
    buffer = torch.zeros(4096)
    with pytest.raises(EmulatorError, match=message):
        kernels.run(which, buffer.data_ptr(), buffer.data_ptr(), 1, threads, 0)
    kernels.run(1, torch.zeros(32).data_ptr(), buffer.data_ptr(), 1, 32, 0)  # and the library works on


def test_guarded_ptx_runs_its_fallback(kernels):
    out = torch.zeros(64, dtype=torch.int32)
    kernels.run(10, out.data_ptr(), 0, 1, 64, 0)
    assert torch.equal(out, torch.arange(64, dtype=torch.int32) % 32)


def test_an_unknown_schedule_is_refused(kernels):
    with cuda_emu.schedule("sideways"), pytest.raises(EmulatorError, match="CUDA_EMU_SCHEDULE=sideways"):
        kernels.run(1, torch.zeros(32).data_ptr(), torch.zeros(1).data_ptr(), 1, 32, 0)


# ---------------------------------------------------------------------------------------------------------------
# The mutation test: each mutation, at a site drawn with a fixed seed from both files' kernels, makes that file's kernel
# checks fail (a wrong or unwritten output, or an error from the emulator).

def drop_barrier(source, m):
    return source[:m.start()] + source[m.end():]


def return_half_the_lanes(source, m):  # the line of the shuffle or mma becomes a block that lets lanes 16-31 leave
    return source[:m.start()] + "{ if (threadIdx.x % 32 >= 16) return; " + m[0] + " }" + source[m.end():]


def round_the_grid_down(source, m):  # (N + R - 1) / R -> N / (R)
    return source[:m.start()] + f"{m[1]} / ({m[2]})" + source[m.end():]


def offset_a_16_byte_load(source, m):  # reinterpret_cast<const uint4*>(p) -> ...(8 + reinterpret_cast<const char*>(p))
    depth, end = 1, m.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(source[end], 0)
        end += 1
    return source[:m.end()] + "8 + reinterpret_cast<const char*>(" + source[m.end():end - 1] + "))" + source[end:]


MUTATIONS = {
    "a dropped barrier": (r"__sync(?:threads|warp)\(\);", drop_barrier),
    "half the lanes return before a warp collective": (r"(?m)^\s*[^\n]*(?:__shfl_xor_sync|\bmma<T>\()[^\n]*$",
                                                       return_half_the_lanes),
    "the grid rounded down": (r"\((\w+) \+ ([^()]+?) - 1\) / \(?\2\)?", round_the_grid_down),
    "a 16-byte load 8 bytes off": (r"reinterpret_cast<const uint4\*>\(", offset_a_16_byte_load),
}


def quantize_checks(backend):
    check = test_quantize_kernels
    check.check_gemv(backend, "int8", None, [(37, 1280)], [1, 3])
    check.check_gemv(backend, "int4", 64, [(37, 2304)], [2])
    check.check_dequantize(backend, 32, [(37, 256)])


def anyprec_checks(backend):
    check = test_anyprec_kernels
    check.check_gemv(backend, [(37, 1056), (5, 96)], [3], [1, 3])
    check.check_dequant(backend, [(37, 1056)], [4])


FILES = [(quantize, quantize_checks), (anyprec, anyprec_checks)]


def mutants(seed=0):
    """{mutation: (module, its checks, the mutated source)}, each site drawn from every match in both files."""
    rng = random.Random(seed)
    chosen = {}
    for name, (pattern, mutate) in MUTATIONS.items():
        sites = [(module, checks, m) for module, checks in FILES for m in re.finditer(pattern, module.CUDA_SOURCE)]
        module, checks, m = rng.choice(sites)
        chosen[name] = module, checks, mutate(module.CUDA_SOURCE, m)
    return chosen


@pytest.fixture(scope="module")
def mutant_builds():
    """The mutants built two at a time, at -O0 (they run small shapes): {mutation: (module, checks, kernels)}."""
    chosen = mutants()

    def build(item):  # the mutated CUDA_SOURCE in place of the original, among the sources kernels() builds
        module, checks, source = item
        mutate = lambda sources: (source if isinstance(sources, str) else
                                  [source if s is module.CUDA_SOURCE else s for s in sources])
        return module, checks, cuda_emu.build(module, mutate=mutate, flags=["-O0"])
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(chosen, pool.map(build, chosen.values())))


def test_the_checks_pass_on_the_kernels_as_they_are():
    for module, checks in FILES:
        with cuda_emu.emulated(module, cuda_emu.build(module)) as backend:
            checks(backend)


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_mutation_fails_the_kernel_checks(mutant_builds, mutation):
    module, checks, kernels = mutant_builds[mutation]
    with cuda_emu.emulated(module, kernels) as backend:
        with pytest.raises((AssertionError, EmulatorError)):
            checks(backend)


# ---------------------------------------------------------------------------------------------------------------
# Tensor cores and asynchronous copies: mma.sync, ldmatrix and cp.async, each against the PTX ISA's description (the
# fragments a lane gathers by the documented layout, multiplied, must equal a plain matmul), and the pipeline mistakes
# that the schedules expose.

TENSOR_KERNELS = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ unsigned pair(const unsigned short* p, int stride = 1) { return p[0] | unsigned(p[stride]) << 16; }

// D = A B + C with each lane's fragments gathered from global memory by the PTX ISA's layout (lane = 4 g + t): one
// product per warp, A 16x16 and B 16x8 (as [k][n]) 16-bit, C and D 16x8 fp32, all row-major.
template <typename T>
__global__ void mma_from_fragments(const unsigned short* A, const unsigned short* B, const float* C, float* D) {
  const int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  A += 256 * w, B += 128 * w, C += 128 * w, D += 128 * w;
  const unsigned a[4] = {pair(A + 16 * g + 2 * t), pair(A + 16 * (g + 8) + 2 * t), pair(A + 16 * g + 2 * t + 8),
                         pair(A + 16 * (g + 8) + 2 * t + 8)};
  const unsigned b[2] = {pair(B + 8 * (2 * t) + g, 8), pair(B + 8 * (2 * t + 8) + g, 8)};
  const float c[4] = {C[8 * g + 2 * t], C[8 * g + 2 * t + 1], C[8 * (g + 8) + 2 * t], C[8 * (g + 8) + 2 * t + 1]};
  float d[4];
  emu_mma_m16n8k16<T>(d, a, b, c);
  D[8 * g + 2 * t] = d[0], D[8 * g + 2 * t + 1] = d[1], D[8 * (g + 8) + 2 * t] = d[2], D[8 * (g + 8) + 2 * t + 1] = d[3];
}

// The same product with A and B taken from shared memory by ldmatrix: A by .x4 (its four 8x8 quarters), B stored [k][n]
// by .x2.trans.
template <typename T>
__global__ void mma_from_shared(const unsigned short* A, const unsigned short* B, const float* C, float* D) {
  __shared__ uint4 a_tile[32], b_tile[16];  // 16 rows of 32 bytes, 16 rows of 16 bytes
  unsigned short* a_elements = reinterpret_cast<unsigned short*>(a_tile);
  unsigned short* b_elements = reinterpret_cast<unsigned short*>(b_tile);
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 256; i += 32) a_elements[i] = A[i];
  for (int i = lane; i < 128; i += 32) b_elements[i] = B[i];
  __syncthreads();
  unsigned a[4], b[2];
  emu_ldmatrix<4>(a, a_elements + 16 * (lane % 8 + 8 * (lane / 8 % 2)) + 8 * (lane / 16));
  emu_ldmatrix<2, true>(b, b_elements + 8 * (lane % 16));
  const float c[4] = {C[8 * g + 2 * t], C[8 * g + 2 * t + 1], C[8 * (g + 8) + 2 * t], C[8 * (g + 8) + 2 * t + 1]};
  float d[4];
  emu_mma_m16n8k16<T>(d, a, b, c);
  D[8 * g + 2 * t] = d[0], D[8 * g + 2 * t + 1] = d[1], D[8 * (g + 8) + 2 * t] = d[2], D[8 * (g + 8) + 2 * t + 1] = d[3];
}

// 32 rows of 8 elements in shared memory at a 48-byte stride; lane l names row l; every lane writes the N registers
// ldmatrix gives it, at out[4 l + j].
template <int N, bool TRANS>
__global__ void ldmatrix_rows(const unsigned short* rows, unsigned* out) {
  __shared__ uint4 tile[96];
  unsigned short* elements = reinterpret_cast<unsigned short*>(tile);
  for (int i = threadIdx.x; i < 256; i += 32) elements[24 * (i / 8) + i % 8] = rows[i];
  __syncthreads();
  unsigned r[N];
  emu_ldmatrix<N, TRANS>(r, elements + 24 * threadIdx.x);
  for (int j = 0; j < N; j++) out[4 * threadIdx.x + j] = r[j];
}

// 64 threads copy src [2][64][4] floats into two shared buffers with cp.async, 16 bytes a thread and buffer, reading
// only the first 4 * (thread % 5) bytes of each (the rest zero-filled); buffer b is commit group b. variant 0 waits as
// a pipeline must and writes both buffers to out [2][64][4]; 1 reads the buffers without waiting; 2 then overwrites
// buffer 0 with src's second half while other threads still read it (no barrier in between): out [64][4] is what
// thread t read of thread (t + 1) % 64's chunk.
__global__ void async_copies(const float* src, float* out, int variant) {
  extern __shared__ float buffers[];  // [2][64][4]
  const int t = threadIdx.x, bytes = 4 * (t % 5);
  for (int b = 0; b < 2; b++) {
    emu_cp_async(buffers + 256 * b + 4 * t, src + 256 * b + 4 * t, 16, bytes);
    emu_cp_async_commit();
  }
  if (variant == 0) {
    emu_cp_async_wait(1);  // buffer 0 landed, for every thread once all pass the barrier
    __syncthreads();
    for (int i = 0; i < 4; i++) out[4 * t + i] = buffers[4 * t + i];
    emu_cp_async_wait(0);
    __syncthreads();
    for (int i = 0; i < 4; i++) out[256 + 4 * t + i] = buffers[256 + 4 * t + i];
  } else if (variant == 1) {
    __syncthreads();
    for (int i = 0; i < 8; i++) out[8 * t + i] = buffers[256 * (i / 4) + 4 * t + i % 4];
  } else {
    emu_cp_async_wait(0);
    __syncthreads();
    emu_cp_async(buffers + 4 * t, src + 256 + 4 * t, 16, 16);
    emu_cp_async_commit();
    for (int i = 0; i < 4; i++) out[4 * t + i] = buffers[4 * ((t + 1) % 64) + i];
    emu_cp_async_wait(0);
  }
}

// Mistakes, one a kernel.
__global__ void mma_with_lanes_gone(float* out) {
  if (threadIdx.x >= 16) return;
  const unsigned a[4] = {}, b[2] = {};
  float d[4] = {};
  emu_mma_m16n8k16<__half>(d, a, b, d);
  out[threadIdx.x] = d[0];
}
__global__ void ldmatrix_misaligned(unsigned* out) {
  __shared__ uint4 tile[32];
  unsigned r[1];
  emu_ldmatrix<1>(r, reinterpret_cast<char*>(tile) + 16 * threadIdx.x + 8);
  out[threadIdx.x] = r[0];
}
__global__ void cp_async_12_bytes(float* out) {
  __shared__ uint4 tile[32];
  emu_cp_async(tile + threadIdx.x, out, 12, 12);
}
__global__ void big_shared(float* out) {
  extern __shared__ float buffer[];
  buffer[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = buffer[31 - threadIdx.x];
}

int tensor_run(int64_t which, int64_t a, int64_t b, int64_t c, int64_t d, int64_t blocks) {
  using u16 = const unsigned short*;
  const auto f = [](int64_t p) { return reinterpret_cast<float*>(p); };
  switch (which) {
    case 0: mma_from_fragments<__half><<<blocks, 64>>>(u16(a), u16(b), f(c), f(d)); break;
    case 1: mma_from_fragments<__nv_bfloat16><<<blocks, 64>>>(u16(a), u16(b), f(c), f(d)); break;
    case 2: mma_from_shared<__half><<<1, 32>>>(u16(a), u16(b), f(c), f(d)); break;
    case 3: mma_from_shared<__nv_bfloat16><<<1, 32>>>(u16(a), u16(b), f(c), f(d)); break;
    case 4: ldmatrix_rows<1, false><<<1, 32>>>(u16(a), reinterpret_cast<unsigned*>(b)); break;
    case 5: ldmatrix_rows<2, false><<<1, 32>>>(u16(a), reinterpret_cast<unsigned*>(b)); break;
    case 6: ldmatrix_rows<4, false><<<1, 32>>>(u16(a), reinterpret_cast<unsigned*>(b)); break;
    case 7: ldmatrix_rows<4, true><<<1, 32>>>(u16(a), reinterpret_cast<unsigned*>(b)); break;
    case 8: case 9: case 10: async_copies<<<1, 64, 2048>>>(f(a), f(b), int(which - 8)); break;
    case 11: mma_with_lanes_gone<<<1, 32>>>(f(a)); break;
    case 12: ldmatrix_misaligned<<<1, 32>>>(reinterpret_cast<unsigned*>(a)); break;
    case 13: cp_async_12_bytes<<<1, 32>>>(f(a)); break;
    case 14: big_shared<<<1, 32, 64 << 10>>>(f(a)); break;
    case 15:
      if (cudaError_t e = cudaFuncSetAttribute(big_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10)) return e;
      big_shared<<<1, 32, 64 << 10>>>(f(a));
      break;
  }
  return cudaGetLastError();
}
"""
TENSOR_RUN = ["int tensor_run(int64_t which, int64_t a, int64_t b, int64_t c, int64_t d, int64_t blocks);"]


@pytest.fixture(scope="module")
def tensor_kernels():
    return cuda_emu.load_inline("emulator_tensor_tests", TENSOR_RUN, TENSOR_KERNELS, ["tensor_run"])


def bits16(t):
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("operands", ["fragments", "ldmatrix"])
def test_mma_equals_a_plain_matmul(tensor_kernels, schedule, dtype, operands):
    """D = A B + C (products exact, the sum rounded once to fp32: the float64 matmul rounded), 6 products on 2-warp
    blocks from fragments gathered by the documented layout, or one from ldmatrix.x4 (A) and .x2.trans (B)."""
    count = 6 if operands == "fragments" else 1
    A = torch.randn(count, 16, 16).to(dtype)
    B = torch.randn(count, 16, 8).to(dtype)
    A[:, 3, 5], B[:, 5, 2] = 1000, 1000  # one large product: the sum must not be rounded per step
    C = torch.randn(count, 16, 8)
    D = torch.full((count, 16, 8), float("nan"))
    which = (0 if operands == "fragments" else 2) + (dtype == torch.bfloat16)
    tensor_kernels.tensor_run(which, bits16(A).data_ptr(), bits16(B).data_ptr(), C.data_ptr(), D.data_ptr(), 3)
    assert torch.equal(D, (A.double() @ B.double() + C.double()).float())


@pytest.mark.parametrize("count,trans", [(1, False), (2, False), (4, False), (4, True)],
                         ids=["x1", "x2", "x4", "x4.trans"])
def test_ldmatrix_gives_each_lane_its_pairs(tensor_kernels, schedule, count, trans):
    """Lane l gets, of matrix j (rows from lanes 8j..8j+7), elements 2(l%4), 2(l%4)+1 of row l/4 (of column l/4 with
    .trans), the first in the low half."""
    rows = torch.randint(0, 2**16, (32, 8), dtype=torch.int32).to(torch.int16)
    out = torch.zeros(32, 4, dtype=torch.int64)
    out32 = torch.zeros(32, 4, dtype=torch.int32)
    tensor_kernels.tensor_run({1: 4, 2: 5, 4: 6}[count] + trans, rows.data_ptr(), out32.data_ptr(), 0, 0, 1)
    u = rows.to(torch.int64) & 0xffff
    for lane in range(32):
        for j in range(count):
            m = u[8 * j:8 * j + 8]
            lo, hi = ((m[2 * (lane % 4), lane // 4], m[2 * (lane % 4) + 1, lane // 4]) if trans else
                      (m[lane // 4, 2 * (lane % 4)], m[lane // 4, 2 * (lane % 4) + 1]))
            out[lane, j] = lo | hi << 16
    assert torch.equal(out32.to(torch.int64) & 0xffffffff, out & 0xffffffff)


def test_cp_async_copies_zero_fills_and_lands_by_its_group(tensor_kernels, schedule):
    src = torch.randn(2, 64, 4)
    expected = src.clone()
    for t in range(64):
        expected[:, t, t % 5:] = 0
    out = torch.full((2, 64, 4), float("nan"))
    tensor_kernels.tensor_run(8, src.data_ptr(), out.data_ptr(), 0, 0, 1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("variant", [1, 2], ids=["a stage read before its wait", "a stage overwritten while read"])
def test_pipeline_mistakes_change_the_result_with_the_schedule(tensor_kernels, variant):
    """A copy lands at issue under "forward" and at its wait under "reverse": a read before the wait, or a copy into a
    stage that another thread still reads, gives another result (which the kernel tests' comparison flags)."""
    src = torch.randn(2, 64, 4)
    results = []
    for name in ("forward", "reverse"):
        out = torch.zeros(64, 8)
        with cuda_emu.schedule(name):
            tensor_kernels.tensor_run(8 + variant, src.data_ptr(), out.data_ptr(), 0, 0, 1)
        results.append(out)
    assert not torch.equal(cuda_emu.bits(results[0]), cuda_emu.bits(results[1]))


TENSOR_MISTAKES = {
    "mma with lanes gone": (11, r"^mma_with_lanes_gone, .*(names lanes 16-31, which have exited|exits while lanes "
                                r"0-15 wait for it at mma.sync.m16n8k16.f16)"),
    "misaligned ldmatrix": (12, r"^ldmatrix_misaligned, .*ldmatrix.x1 \(line \d+\) of 16 bytes at 0x[0-9a-f]+, which "
                                r"is not 16-byte aligned"),
    "cp.async of 12 bytes": (13, r"^cp_async_12_bytes, .*cp.async \(line \d+\) of 12 bytes"),
    "64 KB without cudaFuncSetAttribute": (14, r"^big_shared: 65536 bytes of dynamic shared memory, more than the "
                                               r"49152 that cudaFuncSetAttribute allowed"),
}


@pytest.mark.parametrize("mistake", TENSOR_MISTAKES)
def test_tensor_mistakes_raise_naming_the_kernel(tensor_kernels, mistake):
    which, message = TENSOR_MISTAKES[mistake]
    buffer = torch.zeros(4096)
    with pytest.raises(EmulatorError, match=message):
        tensor_kernels.tensor_run(which, buffer.data_ptr(), 0, 0, 0, 1)


def test_cuda_func_set_attribute_allows_more_shared_memory(tensor_kernels):
    out = torch.zeros(32)
    tensor_kernels.tensor_run(15, out.data_ptr(), 0, 0, 0, 1)
    assert torch.equal(out, torch.arange(31, -1, -1, dtype=torch.float32))
