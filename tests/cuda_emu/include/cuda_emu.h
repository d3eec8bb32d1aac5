// Enough of CUDA to run a kernel source on the CPU, for the tests (tests/cuda_emu/__init__.py builds with it).
//
// Every CUDA thread of a block is a fiber with its own stack. A fiber runs alone until it reaches __syncthreads or a
// warp collective, then yields to its block's scheduler, which resumes the ready fibers in the order that
// CUDA_EMU_SCHEDULE names: "forward" (thread 0 first), "reverse" or "random:SEED" (reshuffled every round). A result
// that changes with the schedule is a race. Blocks are independent: OS threads take them in turn.
// What a GPU would hang on, fault on or silently compute garbage from (a deadlock, a collective naming an exited or
// absent lane, a misaligned access, a bad launch configuration, inline PTX) stops the launch with a message naming
// the kernel, the block, the thread and the source line; Python raises it (emu_take_error).
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__) || defined(CUDA_EMU_UCONTEXT)
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------------------------------
// Qualifiers. Static __shared__ arrays live per OS thread, whose blocks take turns; after each declaration the Python
// side adds a call that fills the array with NaN bytes when a block first reaches it: a read before a write shows.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local
#define __constant__

// ---------------------------------------------------------------------------------------------------------------
// Vector types, aligned as CUDA aligns them (a misaligned uint4 access is then an error, as on the GPU).

#define EMU_VECTORS(name, T)                                                                                        \
  struct alignas(2 * sizeof(T)) name##2 { T x, y; };                                                                \
  struct name##3 { T x, y, z; };                                                                                    \
  struct alignas(4 * sizeof(T) > 16 ? 16 : 4 * sizeof(T)) name##4 { T x, y, z, w; };                                \
  inline name##2 make_##name##2(T x, T y) { return {x, y}; }                                                        \
  inline name##3 make_##name##3(T x, T y, T z) { return {x, y, z}; }                                                \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return {x, y, z, w}; }
EMU_VECTORS(char, signed char)
EMU_VECTORS(uchar, unsigned char)
EMU_VECTORS(short, short)
EMU_VECTORS(ushort, unsigned short)
EMU_VECTORS(int, int)
EMU_VECTORS(uint, unsigned int)
EMU_VECTORS(float, float)
EMU_VECTORS(longlong, long long)
EMU_VECTORS(ulonglong, unsigned long long)
EMU_VECTORS(double, double)
#undef EMU_VECTORS

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
  dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------------------------
// fp16 and bf16: 16-bit structs, converted bit for bit as the GPU converts (round to nearest even, subnormals,
// overflow to infinity, NaN to the canonical 0x7fff). No implicit conversions or operators: load_inline builds with
// __CUDA_NO_HALF_CONVERSIONS__ and friends, so a kernel relying on them would not build there either.

struct alignas(2) __half { unsigned short __x; };
struct alignas(4) __half2 { __half x, y; };
struct alignas(2) __nv_bfloat16 { unsigned short __x; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline float __uint_as_float(unsigned v) { float f; memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; memcpy(&v, &f, 4); return v; }
inline float __int_as_float(int v) { return __uint_as_float(unsigned(v)); }
inline int __float_as_int(float f) { return int(__float_as_uint(f)); }

inline unsigned short emu_float_to_half_bits(float f) {
  const unsigned x = __float_as_uint(f) & 0x7fffffffu, sign = (__float_as_uint(f) >> 16) & 0x8000u;
  // Normal: rebias the exponent (127 to 15) and round the 13 bits dropped to nearest even.
  const unsigned normal = (x - 0x38000000u + 0xfffu + ((x >> 13) & 1u)) >> 13;
  // Below 2^-14, subnormal: in 0.5f + |f| the low mantissa bits count units of 2^-24, rounded to even by the FPU.
  const unsigned subnormal = __float_as_uint(__uint_as_float(x) + 0.5f) - 0x3f000000u;
  const unsigned h = x >= 0x477ff000u ? 0x7c00u : x >= 0x38800000u ? normal : subnormal;  // from 65520 up: infinity
  return x > 0x7f800000u ? 0x7fff : sign | h;
}
inline float emu_half_bits_to_float(unsigned short h) {
  const unsigned sign = unsigned(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1f)  // infinity, or NaN made quiet (its top mantissa bit set), as hardware conversions do
    return __uint_as_float(sign | 0x7f800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0));
  if (exponent != 0) return __uint_as_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  return sign ? -float(mantissa) * 0x1p-24f : float(mantissa) * 0x1p-24f;  // subnormal or zero: exact
}
inline unsigned short emu_float_to_bf16_bits(float f) {
  const unsigned x = __float_as_uint(f);  // round the low 16 bits to even; an overflow carries into infinity
  return (x & 0x7fffffffu) > 0x7f800000u ? 0x7fff : (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
}

inline __half __float2half_rn(float f) { return {emu_float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return emu_half_bits_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {emu_float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(unsigned(h.__x) << 16); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short v) { return {v}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return {v}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }

// ---------------------------------------------------------------------------------------------------------------
// Integer and float intrinsics.

inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {  // byte i of the result: byte s[4i+2:4i] of (y:x)
  const uint64_t both = uint64_t(y) << 32 | x;
  const auto byte = [&](int i) { return unsigned(both >> (8 * ((s >> (4 * i)) & 7))) & 0xffu; };
  return byte(0) | byte(1) << 8 | byte(2) << 16 | byte(3) << 24;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }
inline int __ffs(unsigned v) { return __builtin_ffs(int(v)); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; i++) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float v) { return 1.f / sqrtf(v); }
inline float __saturatef(float v) { return v != v ? 0.f : v < 0.f ? 0.f : v > 1.f ? 1.f : v; }

// ---------------------------------------------------------------------------------------------------------------
// Runtime API: what entry points call around a launch. Streams are opaque handles; the launch runs synchronously.

enum cudaError_t {
  cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchTimeout = 702,
  cudaErrorIllegalInstruction = 715, cudaErrorMisalignedAddress = 716, cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMisalignedAddress: return "misaligned address";
    default: return "the emulator stopped the kernel";
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The emulator: errors, fibers and their scheduler, sync points, launches.

#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
// emu_switch(&save, load): push the registers the System V ABI makes a callee keep, store the stack pointer in
// *save, load `load` and pop what that stack saved: a few instructions, where swapcontext also makes a system call.
extern "C" __attribute__((visibility("hidden"))) void emu_switch(void** save, void* load);
__asm__(R"(
  .pushsection .text
  .globl emu_switch
  .hidden emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
  .popsection
)");
#define EMU_UCONTEXT(...)
#else
#define EMU_UCONTEXT(...) __VA_ARGS__
#endif

// The emulator's own hot paths skip -fsanitize=alignment's checks, which are for the kernels' accesses.
#define EMU_HOT __attribute__((no_sanitize_undefined))
#define EMU_INLINE inline __attribute__((always_inline, no_sanitize_undefined))

namespace emu {

enum class State : uint8_t { Ready, AtBarrier, AtCollective, Exited };

struct Fiber {  // one CUDA thread
  void* sp = nullptr;
  EMU_UCONTEXT(ucontext_t context;)
  uint3 idx;
  int lane, warp;
  State state = State::Ready;
  const char* op = nullptr;  // the sync point it waits at, and its line
  int line = 0;
  uint64_t result = 0;  // what the collective it waited at gave it
};

struct Group {  // a warp collective that some of the lanes of `mask` have reached
  const char* op;
  int line;
  unsigned mask, arrived;
  bool ballot;  // each lane gets the mask of lanes whose value is nonzero; else the value of lane src[lane]
  uint64_t value[32];
  int src[32];
};

struct Warp {
  unsigned exited = 0;  // lanes that returned, or that the block does not have
  std::vector<Group> pending;
};

struct Launch {
  const char* text;  // the kernel as its launch names it, for errors before any thread runs
  void (*body)(const void*);  // body(context) runs the kernel with its arguments
  const void* context;
  dim3 grid, block;
  size_t dynamic_smem;
  bool reverse = false, random = false;
  uint64_t seed = 0;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
};

struct Block {
  Launch* launch;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live, at_barrier = 0;
  bool failed = false;
  const char* kernel = nullptr;  // the kernel's __PRETTY_FUNCTION__, once a thread entered it
  void* scheduler_sp = nullptr;
  EMU_UCONTEXT(ucontext_t scheduler;)
};

static thread_local Block* block = nullptr;  // the block this OS thread runs
static thread_local Fiber* self = nullptr;   // the running CUDA thread: null in the scheduler and in host code
static thread_local uint3 block_index;
static thread_local dim3 block_dim, grid_dim;
static thread_local uint64_t block_serial = 0;  // blocks this OS thread started: when to poison shared memory again
static thread_local std::vector<std::pair<void*, uint64_t>> poisoned;
static thread_local std::vector<unsigned char> dynamic_smem;

// The first error since Python last took it (emu_take_error); cudaGetLastError's code apart from it.
static std::mutex error_mutex;
static std::string error_message;
static cudaError_t last_error = cudaSuccess;

inline std::string str(const char* fmt, ...) {
  char buffer[2048];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buffer, sizeof buffer, fmt, args);
  va_end(args);
  return buffer;
}

inline std::string lanes(unsigned mask) {  // "0-15, 20"
  std::string s;
  for (int i = 0; i < 32; i++) {
    if (!(mask >> i & 1)) continue;
    int j = i;
    while (j < 31 && (mask >> (j + 1) & 1)) j++;
    s += (s.empty() ? "" : ", ") + (i == j ? std::to_string(i) : std::to_string(i) + "-" + std::to_string(j));
    i = j;
  }
  return s;
}

// "void {anonymous}::gemv_kernel(const T*, ...) [with int M = 3; T = __half; uint32_t = unsigned int]" becomes
// "gemv_kernel [with int M = 3; T = __half]": the template arguments, without the spellings of typedefs.
inline std::string kernel_title(const std::string& pretty) {
  std::string name = pretty.substr(0, pretty.find('('));
  name = name.substr(name.find_last_of(": ") + 1);
  const size_t with = pretty.find(" [with ");
  if (with == std::string::npos) return name;
  const std::string inner = pretty.substr(with + 7, pretty.size() - with - 8);
  std::string args;
  for (size_t start = 0, end; start < inner.size(); start = end + 2) {
    end = std::min(inner.find("; ", start), inner.size());
    const std::string item = inner.substr(start, end - start), lhs = item.substr(0, item.find(" = "));
    if (lhs.size() < 2 || lhs.compare(lhs.size() - 2, 2, "_t") != 0) args += (args.empty() ? "" : "; ") + item;
  }
  return name + " [with " + args + "]";
}

inline void yield();

// Records the error. Inside a CUDA thread the block stops there and then: that thread is never resumed.
inline void fail(cudaError_t code, const std::string& what) {
  std::string where;
  if (block) {
    where = block->kernel ? kernel_title(block->kernel) : block->launch->text;
    where += str(", block (%u,%u,%u)", block_index.x, block_index.y, block_index.z);
    if (self) where += str(", thread (%u,%u,%u)", self->idx.x, self->idx.y, self->idx.z);
    where += ": ";
  }
  {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (error_message.empty()) error_message = where + what;
    if (last_error == cudaSuccess) last_error = code;
  }
  if (!block) return;
  block->failed = true;
  block->launch->failed = true;
  if (self) yield();
}

// Device code called from host code (nvcc would not compile it; g++ does): an error, and the call does nothing.
EMU_INLINE bool in_kernel(const char* op, int line) {
  if (!self) fail(cudaErrorLaunchFailure, str("%s (line %d) called outside a kernel", op, line));
  return self;
}

// ---- Fibers. A fiber starts in fiber_main, runs the kernel and leaves through exit_thread.

[[noreturn]] void exit_thread();
[[noreturn]] inline void fiber_main() {
  block->launch->body(block->launch->context);
  exit_thread();
}

#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
EMU_INLINE void resume(Fiber& f) { self = &f; emu_switch(&block->scheduler_sp, f.sp); self = nullptr; }
EMU_INLINE void yield() { emu_switch(&self->sp, block->scheduler_sp); }
inline void prepare(Fiber& f, char* top, size_t) {
  void** sp = reinterpret_cast<void**>(top) - 8;  // six saved registers, then emu_switch's `ret` into fiber_main,
  std::fill(sp, sp + 8, nullptr);                  // which finds the stack aligned as after a call
  sp[6] = reinterpret_cast<void*>(&fiber_main);
  f.sp = sp;
}
#else
EMU_INLINE void resume(Fiber& f) { self = &f; swapcontext(&block->scheduler, &f.context); self = nullptr; }
EMU_INLINE void yield() { swapcontext(&self->context, &block->scheduler); }
inline void prepare(Fiber& f, char* top, size_t size) {
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = top - size;
  f.context.uc_stack.ss_size = size;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
}
#endif

struct Stacks {  // an OS thread's fiber stacks, reused by each block it runs, with a guard page below each
  static constexpr size_t SIZE = 128 << 10, GUARD = 4096;
  char* base = nullptr;
  size_t count = 0;
  // Tops staggered by up to 4 KB: page-aligned tops would put every thread's live frames in the same cache sets.
  char* top(size_t i) { return base + (i + 1) * (SIZE + GUARD) - 16 * (i * 37 % 256); }
  bool reserve(size_t n) {
    if (n <= count) return true;
    if (base) munmap(base, count * (SIZE + GUARD)), base = nullptr, count = 0;
    void* p = mmap(nullptr, n * (SIZE + GUARD), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) return false;
    base = static_cast<char*>(p), count = n;
    for (size_t i = 0; i < n; i++) mprotect(base + i * (SIZE + GUARD), GUARD, PROT_NONE);
    return true;
  }
  ~Stacks() {
    if (base) munmap(base, count * (SIZE + GUARD));
  }
};

// ---- Sync points.

inline void release_barrier_if_complete() {  // every live thread of the block at __syncthreads: all go on
  Block& b = *block;
  if (b.at_barrier == 0 || b.at_barrier < b.live) return;
  for (Fiber *f = b.fibers.data(), *end = f + b.fibers.size(); f != end; f++)
    if (f->state == State::AtBarrier) f->state = State::Ready;
  b.at_barrier = 0;
}

EMU_HOT inline void barrier(const char* op, int line) {
  if (!in_kernel(op, line)) return;
  self->state = State::AtBarrier, self->op = op, self->line = line;
  block->at_barrier++;
  release_barrier_if_complete();
  yield();
}

EMU_HOT inline void complete(const Group& g, int warp) {
  unsigned votes = 0;
  for (int l = 0; l < 32; l++)
    if ((g.mask >> l & 1) && g.value[l]) votes |= 1u << l;
  for (int l = 0; l < 32; l++) {
    if (!(g.mask >> l & 1)) continue;
    Fiber& f = block->fibers.data()[32 * warp + l];
    if (!g.ballot && !(g.mask >> g.src[l] & 1))
      fail(cudaErrorIllegalInstruction, str("%s (line %d): lane %d reads lane %d, which the mask 0x%08x leaves out",
                                            g.op, g.line, l, g.src[l], g.mask));
    f.result = g.ballot ? votes : g.value[g.src[l]];
    f.state = State::Ready;
  }
}

// Every lane of `mask` calls this (the same op, the same mask) before any of them goes on.
EMU_HOT inline uint64_t collective(const char* op, int line, unsigned mask, uint64_t value, int src, bool ballot) {
  if (!in_kernel(op, line)) return 0;
  Fiber& me = *self;
  Warp& w = block->warps.data()[me.warp];
  if (!(mask >> me.lane & 1))
    fail(cudaErrorIllegalInstruction, str("%s (line %d) with mask 0x%08x, which leaves out the calling lane %d", op,
                                          line, mask, me.lane));
  if (mask & w.exited)
    fail(cudaErrorIllegalInstruction, str("%s (line %d) names lanes %s, which have exited or do not exist", op, line,
                                          lanes(mask & w.exited).c_str()));
  size_t i = 0;
  for (; i < w.pending.size() && w.pending[i].mask != mask; i++)
    if (w.pending[i].mask & mask)
      fail(cudaErrorIllegalInstruction, str("%s (line %d) with mask 0x%08x while lanes %s wait at %s (line %d) with "
                                            "mask 0x%08x", op, line, mask, lanes(w.pending[i].arrived).c_str(),
                                            w.pending[i].op, w.pending[i].line, w.pending[i].mask));
  if (i == w.pending.size()) w.pending.push_back(Group{op, line, mask, 0, ballot, {}, {}});
  Group& g = w.pending[i];
  if (g.ballot != ballot || (g.op != op && strcmp(g.op, op) != 0))
    fail(cudaErrorIllegalInstruction, str("%s (line %d) while lanes %s of the same mask wait at %s (line %d)", op, line,
                                          lanes(g.arrived).c_str(), g.op, g.line));
  g.value[me.lane] = value, g.src[me.lane] = src, g.arrived |= 1u << me.lane;
  me.state = State::AtCollective, me.op = op, me.line = line;
  if (g.arrived == mask) {
    complete(g, me.warp);
    w.pending.erase(w.pending.begin() + i);
  }
  yield();
  return me.result;
}

[[noreturn]] EMU_HOT inline void exit_thread() {
  Fiber& me = *self;
  Warp& w = block->warps[me.warp];
  me.state = State::Exited;
  w.exited |= 1u << me.lane;
  block->live--;
  for (const Group& g : w.pending)
    if (g.mask >> me.lane & 1)
      fail(cudaErrorIllegalInstruction, str("exits while lanes %s wait for it at %s (line %d)",
                                            lanes(g.arrived).c_str(), g.op, g.line));
  release_barrier_if_complete();
  yield();
  __builtin_unreachable();
}

inline void deadlock() {  // nothing can run, yet threads are left: say who waits where
  std::vector<std::pair<const Fiber*, int>> sites;  // the first thread waiting at each (op, line), and how many
  for (const Fiber& f : block->fibers) {
    if (f.state == State::Exited) continue;
    auto site = std::find_if(sites.begin(), sites.end(),
                             [&](auto& s) { return s.first->line == f.line && !strcmp(s.first->op, f.op); });
    if (site == sites.end()) sites.push_back({&f, 1});
    else site->second++;
  }
  std::string what = "deadlock:";
  for (auto& [f, n] : sites)
    what += str(" %d thread%s (thread (%u,%u,%u) the first) wait at %s (line %d);", n, n > 1 ? "s" : "", f->idx.x,
                f->idx.y, f->idx.z, f->op, f->line);
  fail(cudaErrorLaunchTimeout, what);
}

EMU_INLINE void check_aligned(const void* p, size_t align, const char* op, int line) {
  if (reinterpret_cast<uintptr_t>(p) % align)
    fail(cudaErrorMisalignedAddress, str("%s (line %d) of %zu bytes at %p, which is not %zu-byte aligned", op, line,
                                         align, p, align));
}

// ---- Blocks and launches.

EMU_HOT inline void run_block(Launch& launch, uint64_t linear, Stacks& stacks) {
  Block b;
  b.launch = &launch;
  block = &b;
  const dim3 g = launch.grid, d = launch.block;
  grid_dim = g, block_dim = d;
  block_index = {unsigned(linear % g.x), unsigned(linear / g.x % g.y), unsigned(linear / (uint64_t(g.x) * g.y))};
  const int n = d.x * d.y * d.z;
  b.fibers.resize(n), b.warps.resize((n + 31) / 32), b.live = n;
  if (n % 32) b.warps.back().exited = ~0u << (n % 32);
  for (int i = 0; i < n; i++) {
    Fiber& f = b.fibers[i];
    f.idx = {i % d.x, i / d.x % d.y, i / (d.x * d.y)}, f.lane = i % 32, f.warp = i / 32;
    prepare(f, stacks.top(i), Stacks::SIZE);
  }
  block_serial++;
  dynamic_smem.assign(launch.dynamic_smem + 16, 0xff);  // NaN bytes for every float type
  std::vector<int> order(n);
  for (int i = 0; i < n; i++) order[i] = launch.reverse ? n - 1 - i : i;
  uint64_t rng = launch.seed * 0x9e3779b97f4a7c15ull + linear;  // a splitmix64 stream per block
  while (b.live > 0 && !b.failed && !launch.failed) {  // a round: every ready thread runs to its next sync point
    for (int i = n - 1; launch.random && i > 0; i--) {  // a new random order every round (Fisher-Yates)
      uint64_t z = rng += 0x9e3779b97f4a7c15ull;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull, z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      std::swap(order[i], order[(z ^ (z >> 31)) % (i + 1)]);
    }
    bool ran = false;
    Fiber* fibers = b.fibers.data();
    for (int i : order) {
      if (fibers[i].state != State::Ready) continue;
      resume(fibers[i]);
      ran = true;
      if (b.failed) break;
    }
    if (!ran && !b.failed) deadlock();
  }
  block = nullptr;
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) raises a kernel's limit on dynamic
// shared memory from 48 KB (up to 227 KB, sm_90's).
inline std::mutex smem_mutex;
inline std::vector<std::pair<const void*, size_t>> smem_limits;
inline size_t smem_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(smem_mutex);
  for (auto& [k, limit] : smem_limits)
    if (k == kernel) return limit;
  return 48 << 10;
}

inline void run(const char* text, dim3 grid, dim3 threads, size_t smem, void (*body)(const void*),
                const void* context, size_t max_smem = 48 << 10) {
  const uint64_t n = uint64_t(threads.x) * threads.y * threads.z, blocks = uint64_t(grid.x) * grid.y * grid.z;
  if (!blocks || !n || n > 1024 || threads.z > 64 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return fail(cudaErrorInvalidConfiguration, str("%s: invalid launch configuration: grid (%u,%u,%u), block "
                                                   "(%u,%u,%u)", text, grid.x, grid.y, grid.z, threads.x, threads.y,
                                                   threads.z));
  if (smem > max_smem)
    return fail(cudaErrorInvalidValue, str("%s: %zu bytes of dynamic shared memory, more than the %zu that "
                                           "cudaFuncSetAttribute allowed (48 KB without it)", text, smem, max_smem));
  Launch launch{text, body, context, grid, threads, smem};
  const std::string schedule = getenv("CUDA_EMU_SCHEDULE") ? getenv("CUDA_EMU_SCHEDULE") : "forward";
  if (schedule == "reverse") {
    launch.reverse = true;
  } else if (schedule == "random" || schedule.rfind("random:", 0) == 0) {
    launch.random = true;
    launch.seed = schedule.size() > 7 ? strtoull(schedule.c_str() + 7, nullptr, 10) : 0;
  } else if (schedule != "forward") {
    return fail(cudaErrorInvalidValue, "CUDA_EMU_SCHEDULE=" + schedule + ": expected forward, reverse or random:SEED");
  }
  const char* threads_env = getenv("CUDA_EMU_THREADS");  // OS threads; all cores by default
  const uint64_t cores = threads_env ? atoi(threads_env) : std::thread::hardware_concurrency();
  const uint64_t workers = std::min(blocks, cores);
  auto work = [&] {
    Stacks stacks;
    if (!stacks.reserve(n)) return fail(cudaErrorLaunchFailure, str("%s: no memory for %d fiber stacks", text, int(n)));
    for (uint64_t i; !launch.failed && (i = launch.next++) < blocks;) run_block(launch, i, stacks);
  };
  std::vector<std::thread> pool;
  for (uint64_t i = 1; i < workers; i++) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to launcher("kernel", kernel, grid, block, smem, stream)
// (args): the arguments convert to the kernel's parameter types as in a call, and every thread gets its own copies.
template <typename... P>
struct Launcher {
  const char* text;
  void (*kernel)(P...);
  dim3 grid, threads;
  size_t smem;
  void operator()(P... args) const {
    const auto body = [&] { kernel(args...); };
    run(text, grid, threads, smem, [](const void* f) { (*static_cast<decltype(body)*>(f))(); }, &body,
        smem_limit(reinterpret_cast<const void*>(kernel)));
  }
};
template <typename... P, typename Stream = cudaStream_t>
Launcher<P...> launcher(const char* text, void (*kernel)(P...), dim3 grid, dim3 threads, size_t smem = 0,
                        Stream = {}) {
  return {text, kernel, grid, threads, smem};
}

inline void entered(const char* pretty) {  // the first statement of every kernel (the Python side inserts it)
  if (block && !block->kernel) block->kernel = pretty;
}

inline void poison_shared(void* p, size_t bytes) {  // after every __shared__ declaration (the Python side adds it)
  for (auto& [address, serial] : poisoned)
    if (address == p) {
      if (serial != block_serial) memset(p, 0xff, bytes), serial = block_serial;
      return;
    }
  poisoned.push_back({p, block_serial});
  memset(p, 0xff, bytes);
}

inline void* dynamic_shared() {  // extern __shared__ T name[] becomes T* name = (T*)dynamic_shared()
  if (!block) fail(cudaErrorLaunchFailure, "extern __shared__ memory used outside a kernel");
  return dynamic_smem.data();
}

inline void unsupported_asm(const char* text, int line) {
  fail(cudaErrorIllegalInstruction, str("inline assembly (line %d) cannot run on the CPU: asm(%.160s); guard it with "
                                        "#if defined(__CUDA_ARCH__) and give a C++ fallback", line, text));
}

}  // namespace emu

#define threadIdx (::emu::self->idx)
#define blockIdx (::emu::block_index)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define EMU_ASM(...) ::emu::unsupported_asm(#__VA_ARGS__, __LINE__)

inline cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(emu::error_mutex);
  return std::exchange(emu::last_error, cudaSuccess);
}
inline cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> lock(emu::error_mutex);
  return emu::last_error;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaPeekAtLastError(); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaPeekAtLastError(); }

// ---------------------------------------------------------------------------------------------------------------
// Sync points, warp collectives and memory, as kernels call them. `line` defaults to the caller's line.

inline void __syncthreads(int line = __builtin_LINE()) { emu::barrier("__syncthreads", line); }
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
  emu::collective("__syncwarp", line, mask, 0, 0, true);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline unsigned __ballot_sync(unsigned mask, int predicate, int line = __builtin_LINE()) {
  return unsigned(emu::collective("__ballot_sync", line, mask, predicate != 0, 0, true));
}
inline int __any_sync(unsigned mask, int predicate, int line = __builtin_LINE()) {
  return unsigned(emu::collective("__any_sync", line, mask, predicate != 0, 0, true)) != 0;
}
inline int __all_sync(unsigned mask, int predicate, int line = __builtin_LINE()) {
  return unsigned(emu::collective("__all_sync", line, mask, predicate != 0, 0, true)) == mask;
}

namespace emu {
// Shuffles: each lane names the lane it reads (its own where CUDA returns the caller's value), in segments of width.
template <typename T>
EMU_HOT T shuffle(const char* op, int line, unsigned mask, T v, int width,
                  int (*source)(int lane, int base, int width, int arg), int arg) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move values of up to 8 bytes");
  if (!in_kernel(op, line)) return v;
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(cudaErrorInvalidValue, str("%s (line %d): width %d is not a power of two up to 32", op, line, width));
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  const int lane = self->lane;
  bits = collective(op, line, mask, bits, source(lane, lane & ~(width - 1), width, arg), false);
  memcpy(&v, &bits, sizeof(T));
  return v;
}
}  // namespace emu

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32, int line = __builtin_LINE()) {
  return emu::shuffle("__shfl_sync", line, mask, v, width,
                      [](int, int base, int width, int src) { return base + (src & (width - 1)); }, src);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, int line = __builtin_LINE()) {
  return emu::shuffle("__shfl_up_sync", line, mask, v, width,
                      [](int lane, int base, int, int d) { return lane - d >= base ? lane - d : lane; }, int(delta));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, int line = __builtin_LINE()) {
  return emu::shuffle("__shfl_down_sync", line, mask, v, width,
                      [](int lane, int base, int width, int d) { return lane + d < base + width ? lane + d : lane; },
                      int(delta));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, int line = __builtin_LINE()) {
  return emu::shuffle("__shfl_xor_sync", line, mask, v, width,
                      [](int lane, int base, int width, int m) { return (lane ^ m) < base + width ? lane ^ m : lane; },
                      lane_mask);
}

// Loads and stores with cache hints are plain accesses, checked for alignment (a GPU faults on a misaligned one).
#define EMU_LOAD(name)                                                                                             \
  template <typename T> T name(const T* p, int line = __builtin_LINE()) {                                          \
    emu::check_aligned(p, alignof(T), #name, line);                                                                \
    return *p;                                                                                                     \
  }
#define EMU_STORE(name)                                                                                            \
  template <typename T> void name(T* p, T v, int line = __builtin_LINE()) {                                        \
    emu::check_aligned(p, alignof(T), #name, line);                                                                \
    *p = v;                                                                                                        \
  }
EMU_LOAD(__ldg) EMU_LOAD(__ldca) EMU_LOAD(__ldcg) EMU_LOAD(__ldcs) EMU_LOAD(__ldlu) EMU_LOAD(__ldcv)
EMU_STORE(__stwb) EMU_STORE(__stcg) EMU_STORE(__stcs) EMU_STORE(__stwt)
#undef EMU_LOAD
#undef EMU_STORE

// Atomics: blocks run on several OS threads at once.
template <typename T> T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <typename T> T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <typename T> T atomicCAS(T* p, T expected, T v) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, v);
  return expected;
}

// Plain loads and stores in kernels are checked by g++'s -fsanitize=alignment, which calls these (GCC's layout of
// the data it passes); the access is then reported where the kernel makes it.
struct EmuUbsanType { unsigned short kind, info; char name[1]; };
struct EmuUbsanMismatch {
  const char* file;
  unsigned line, column;
  const EmuUbsanType* type;
  unsigned char log_alignment, check_kind;
};
#define EMU_UBSAN extern "C" __attribute__((visibility("hidden"))) void
EMU_UBSAN __ubsan_handle_type_mismatch_v1(EmuUbsanMismatch* d, uintptr_t p) {
  static const char* kinds[] = {"load", "store", "reference", "member access", "member call"};
  emu::fail(cudaErrorMisalignedAddress, emu::str("%s of %s (line %u) at %p, which is not %d-byte aligned",
                                                 d->check_kind < 5 ? kinds[d->check_kind] : "access", d->type->name,
                                                 d->line, reinterpret_cast<void*>(p), 1 << d->log_alignment));
}
EMU_UBSAN __ubsan_handle_type_mismatch_v1_abort(EmuUbsanMismatch* d, uintptr_t p) {
  __ubsan_handle_type_mismatch_v1(d, p);
}

// For Python: the first error since the last call, or "" (and the library's state is clean again).
extern "C" __attribute__((visibility("default"))) int emu_take_error(char* buffer, int size) {
  std::lock_guard<std::mutex> lock(emu::error_mutex);
  snprintf(buffer, size, "%s", emu::error_message.c_str());
  const int had = !emu::error_message.empty();
  emu::error_message.clear();
  return had;
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor cores and asynchronous copies, from the PTX ISA's descriptions: mma.sync.m16n8k16 (bf16 or fp16 inputs, fp32
// accumulators), ldmatrix.m8n8 (.x1, .x2, .x4, optionally .trans) and cp.async (4, 8 or 16 bytes, zero fill, commit and
// wait groups), with the packed half-precision fma that dequantization feeds them with. A kernel source reaches them
// through small device functions whose bodies are the PTX under #if defined(__CUDA_ARCH__) and, under
// #elif defined(CUDA_EMU), a call of the emu_ function of the same meaning here.
#define CUDA_EMU 1

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8, cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;  // the carveout is a hint
  if (value < 0 || value > 227 << 10) return cudaErrorInvalidValue;                // sm_90's 227 KB a block
  std::lock_guard<std::mutex> lock(emu::smem_mutex);
  const void* key = reinterpret_cast<const void*>(kernel);
  for (auto& [k, limit] : emu::smem_limits)
    if (k == key) return limit = value, cudaSuccess;
  emu::smem_limits.push_back({key, size_t(value)});
  return cudaSuccess;
}

namespace emu {
// v rounded to a float with the last bit set when inexact ("round to odd"): rounding that float to 16 bits then rounds
// v itself correctly, as if once.
inline float round_to_odd(double v) {
  float f = float(v);
  if (double(f) != v && std::isfinite(f)) {
    if (std::fabs(double(f)) > std::fabs(v)) f = std::nextafter(f, 0.f);
    f = __uint_as_float(__float_as_uint(f) | 1u);
  }
  return f;
}
// a * b + c rounded once: the product of two 16-bit floats is exact in a double, and so is the sum with c unless their
// exponents are over 29 binades apart (there the sum is rounded twice, which can differ from once in rare ties).
inline float fma16(float a, float b, float c) { return round_to_odd(double(a) * double(b) + double(c)); }
}  // namespace emu

inline __half __hfma(__half a, __half b, __half c) {
  return __float2half_rn(emu::fma16(__half2float(a), __half2float(b), __half2float(c)));
}
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __float2bfloat16_rn(emu::fma16(__bfloat162float(a), __bfloat162float(b), __bfloat162float(c)));
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) { return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; }
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
inline __half2 __float2half2_rn(float f) { return {__float2half_rn(f), __float2half_rn(f)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return {__float2bfloat16_rn(f), __float2bfloat16_rn(f)}; }

namespace emu {
// A warp-wide instruction (.sync.aligned: all 32 lanes execute the same one): each lane leaves its operands, the last
// to arrive computes every lane's results (reading shared memory then, once, as the instruction does), and no lane
// goes on before all have arrived (a collective, with its checks: exited lanes, another instruction in between).
struct WarpOp {
  const char* name = nullptr;
  unsigned arrived = 0;
  unsigned a[32][4], b[32][2], r[32][4];
  float c[32][4], d[32][4];
  const void* rows[32];
};
static thread_local std::vector<WarpOp> warp_ops;
static thread_local uint64_t warp_ops_serial = ~0ull;

template <typename Stage, typename Compute>
inline bool warp_instruction(const char* name, int line, Stage stage, Compute compute) {
  if (!in_kernel(name, line)) return false;
  if (warp_ops_serial != block_serial) warp_ops.assign(block->warps.size(), WarpOp{}), warp_ops_serial = block_serial;
  WarpOp& op = warp_ops[self->warp];
  if (op.arrived && strcmp(op.name, name) != 0)
    fail(cudaErrorIllegalInstruction, str("%s (line %d) while lanes %s of its warp wait at %s", name, line,
                                          lanes(op.arrived).c_str(), op.name));
  op.name = name;
  stage(op, self->lane);
  op.arrived |= 1u << self->lane;
  if (op.arrived == 0xffffffffu) {
    compute(op);
    op.arrived = 0;
  }
  collective(name, line, 0xffffffffu, 0, 0, true);
  return true;
}

template <typename T> inline float element(unsigned reg, int i) {  // element i (0: the low half) of a 32-bit pair
  const unsigned short bits = reg >> (16 * i);
  if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(bits));
  else return __bfloat162float(__ushort_as_bfloat16(bits));
}
}  // namespace emu

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: D = A B + C, A 16x16, B 16x8, C and D 16x8 in fp32.
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), lane = 4 g + t, the first element
// of a pair in the low half of its register: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9],
// a[3] = A[g+8][2t+8, 2t+9]; b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]; c, d[0, 1] = [g][2t, 2t+1], c, d[2, 3] =
// [g+8][2t, 2t+1]. The ISA leaves the order and internal precision of the sum open: here the products are exact and
// the sum of the 16 and C is rounded once, to fp32.
template <typename T>
void emu_mma_m16n8k16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4],
                      int line = __builtin_LINE()) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma.sync takes fp16 or bf16");
  const auto stage = [&](emu::WarpOp& op, int lane) {
    for (int i = 0; i < 4; i++) op.a[lane][i] = a[i], op.c[lane][i] = c[i];
    for (int i = 0; i < 2; i++) op.b[lane][i] = b[i];
  };
  const auto compute = [](emu::WarpOp& op) {
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; lane++) {
      const int g = lane / 4, t = lane % 4;
      for (int i = 0; i < 4; i++)
        for (int e = 0; e < 2; e++) A[g + 8 * (i & 1)][2 * t + 8 * (i >> 1) + e] = emu::element<T>(op.a[lane][i], e);
      for (int i = 0; i < 2; i++)
        for (int e = 0; e < 2; e++) B[2 * t + 8 * i + e][g] = emu::element<T>(op.b[lane][i], e);
    }
    for (int lane = 0; lane < 32; lane++)
      for (int i = 0; i < 4; i++) {
        const int row = lane / 4 + 8 * (i >> 1), col = 2 * (lane % 4) + (i & 1);
        double sum = op.c[lane][i];
        for (int k = 0; k < 16; k++) sum += double(A[row][k]) * double(B[k][col]);
        op.d[lane][i] = float(sum);
      }
  };
  if (emu::warp_instruction(std::is_same_v<T, __half> ? "mma.sync.m16n8k16.f16" : "mma.sync.m16n8k16.bf16", line,
                            stage, compute))
    for (int i = 0; i < 4; i++) d[i] = emu::warp_ops[emu::self->warp].d[emu::self->lane][i];
}

// ldmatrix.sync.aligned.m8n8.x{N}[.trans].shared.b16: N 8x8 matrices of 16-bit elements, the 8 rows of matrix j (16
// bytes each, 16-byte aligned) at the addresses that lanes 8j..8j+7 give (the other lanes' are not read). Lane l gets
// in r[j] elements 2(l%4) and 2(l%4)+1 of row l/4 of matrix j; with .trans, of column l/4 (the matrix transposed).
template <int N, bool TRANS = false>
void emu_ldmatrix(unsigned r[N], const void* row, int line = __builtin_LINE()) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  static constexpr const char* names[2][5] = {{"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
                                              {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
  if (emu::self && emu::self->lane < 8 * N) emu::check_aligned(row, 16, names[TRANS][N], line);
  const auto stage = [&](emu::WarpOp& op, int lane) { op.rows[lane] = row; };
  const auto compute = [](emu::WarpOp& op) {
    for (int lane = 0; lane < 32; lane++)
      for (int j = 0; j < N; j++) {
        unsigned short e[2];
        for (int i = 0; i < 2; i++) {
          const int r = TRANS ? 2 * (lane % 4) + i : lane / 4, c = TRANS ? lane / 4 : 2 * (lane % 4) + i;
          memcpy(&e[i], static_cast<const char*>(op.rows[8 * j + r]) + 2 * c, 2);
        }
        op.r[lane][j] = e[0] | unsigned(e[1]) << 16;
      }
  };
  if (emu::warp_instruction(names[TRANS][N], line, stage, compute))
    for (int j = 0; j < N; j++) r[j] = emu::warp_ops[emu::self->warp].r[emu::self->lane][j];
}

// cp.async.{ca,cg}.shared.global [dst], [src], bytes, src_bytes: copies src_bytes (0..bytes) and zero-fills the rest of
// `bytes` (4, 8 or 16; both addresses aligned to it); src is not read when src_bytes is 0. commit_group closes this
// thread's copies issued since the last one into a group (possibly empty); wait_group n waits until at most the n
// newest groups are pending. When a copy lands is up to the hardware, so it follows the schedule: at issue under
// "forward" (a stage overwritten while other threads still read it shows), at the latest wait that covers it under
// "reverse" (reading a stage before waiting for it shows), each copy either way under "random".
namespace emu {
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
  void land() const {
    if (src_bytes) memcpy(dst, src, src_bytes);
    memset(static_cast<char*>(dst) + src_bytes, 0, bytes - src_bytes);
  }
};
struct AsyncThread {
  std::vector<AsyncCopy> open;                 // issued since the last commit
  std::vector<std::vector<AsyncCopy>> groups;  // committed, oldest first, copies not landed yet
  uint64_t issued = 0;
};
static thread_local std::vector<AsyncThread> async_threads;
static thread_local uint64_t async_serial = ~0ull;
inline AsyncThread& async_thread() {
  if (async_serial != block_serial) async_threads.assign(block->fibers.size(), {}), async_serial = block_serial;
  return async_threads[self - block->fibers.data()];
}
}  // namespace emu

inline void emu_cp_async(void* dst, const void* src, int bytes, int src_bytes, int line = __builtin_LINE()) {
  if (!emu::in_kernel("cp.async", line)) return;
  if ((bytes != 4 && bytes != 8 && bytes != 16) || src_bytes < 0 || src_bytes > bytes)
    emu::fail(cudaErrorInvalidValue, emu::str("cp.async (line %d) of %d bytes, %d of them read: it copies 4, 8 or 16, "
                                              "reading 0 to all", line, bytes, src_bytes));
  emu::check_aligned(dst, bytes, "cp.async's shared destination", line);
  if (src_bytes) emu::check_aligned(src, bytes, "cp.async's global source", line);
  emu::AsyncThread& me = emu::async_thread();
  const emu::Launch& launch = *emu::block->launch;
  uint64_t z = launch.seed * 0x9e3779b97f4a7c15ull + uint64_t(emu::self - emu::block->fibers.data()) * 0xbf58476d1ce4e5b9ull
               + me.issued++ * 0x94d049bb133111ebull + (uint64_t(emu::block_index.x) << 32);
  z ^= z >> 29;
  const bool now = launch.random ? (z * 0x9e3779b97f4a7c15ull) >> 63 : !launch.reverse;
  const emu::AsyncCopy copy{dst, src, bytes, src_bytes};
  if (now) copy.land();
  else me.open.push_back(copy);
}
inline void emu_cp_async_commit(int line = __builtin_LINE()) {
  if (!emu::in_kernel("cp.async.commit_group", line)) return;
  emu::AsyncThread& me = emu::async_thread();
  me.groups.push_back(std::move(me.open));
  me.open.clear();
}
inline void emu_cp_async_wait(int n, int line = __builtin_LINE()) {
  if (!emu::in_kernel("cp.async.wait_group", line)) return;
  emu::AsyncThread& me = emu::async_thread();
  while (me.groups.size() > size_t(std::max(n, 0))) {
    for (const emu::AsyncCopy& copy : me.groups.front()) copy.land();
    me.groups.erase(me.groups.begin());
  }
}
