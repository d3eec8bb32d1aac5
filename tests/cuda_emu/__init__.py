"""Run a file's CUDA kernels on the CPU, for the tests (../shared/notes/cuda-emulation.md).

    kernels = cuda_emu.build(anyprec)            # anyprec.kernels(), its own load_inline call, built by g++ for the CPU
    with cuda_emu.schedule("reverse"):
        kernels.gemv(x.data_ptr(), ...)          # CPU addresses; the kernel runs before the call returns

The source compiles unchanged as C++ after include/cuda_emu.h, which stands in for the CUDA headers and runs every
CUDA thread of a block as a fiber. Python rewrites the few things C++ cannot parse or the header cannot see:
`kernel<<<grid, block, smem, stream>>>(args)` becomes a launcher call, every kernel names itself on entry (for error
messages), every __shared__ array is poisoned with NaN bytes when a block first reaches it, `extern __shared__`
becomes the block's dynamic buffer, and inline assembly becomes a run-time error (guard it with
`#if defined(__CUDA_ARCH__)`). The entry points that load_inline's `functions` name must take plain C types (int64_t
addresses, sizes, flags): they are bound with ctypes, and an error the emulator found raises EmulatorError.
Environment: CUDA_EMU_SCHEDULE (forward, the default; reverse; random:SEED) and CUDA_EMU_THREADS (OS threads running
blocks, one per core by default).

Not emulated: the memory model (a thread runs alone between sync points, so code that assumes lockstep warps can
pass), registers, spills, occupancy, static shared memory limits, timing, __CUDA_ARCH__-only code, streams and CUDA
graphs.
"""
import contextlib
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.utils.cpp_extension

INCLUDE = Path(__file__).resolve().parent / "include"
SCHEDULES = ("forward", "reverse", "random:1")  # the order a block's ready threads resume in, every round
CACHE = Path(tempfile.gettempdir()) / f"cuda_emu-{os.getuid()}"  # built libraries, by hash of source and flags
CXX = os.environ.get("CXX", "g++")
# -fsanitize=alignment: every typed access in a kernel checks its address (the header reports a misaligned one);
# -ffp-contract=fast: a * b + c becomes one fma, as nvcc compiles it; -march=native: fmaf is an instruction.
FLAGS = ["-std=c++20", "-O2", "-march=native", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing",
         "-ffp-contract=fast", "-fsanitize=alignment", "-pthread", "-Wno-unknown-pragmas", f"-I{INCLUDE}",
         "-include", "cuda_emu.h"]
C_TYPES = {"int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64, "int": ctypes.c_int, "int32_t": ctypes.c_int32,
           "bool": ctypes.c_bool, "float": ctypes.c_float, "double": ctypes.c_double, "void": None}


class EmulatorError(RuntimeError):
    """What a GPU would hang on, fault on or compute garbage from, naming the kernel, block, thread and line."""


def build(module, mutate=None, flags=()):
    """`module.kernels()` built for the CPU: the file's own load_inline call, with the source it gives (through
    `mutate` first, if given) and g++ `flags` added."""
    def emulated(name, cpp_sources, cuda_sources=None, functions=None, **_):
        return load_inline(name, cpp_sources, mutate(cuda_sources) if mutate else cuda_sources, functions, flags)
    with mock.patch.object(torch.utils.cpp_extension, "load_inline", emulated):
        return module.kernels.__wrapped__()


@contextlib.contextmanager
def schedule(name: str):
    """Launches inside run their blocks' threads in this order: forward, reverse or random:SEED."""
    before = os.environ.get("CUDA_EMU_SCHEDULE")
    os.environ["CUDA_EMU_SCHEDULE"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_EMU_SCHEDULE"]
        else:
            os.environ["CUDA_EMU_SCHEDULE"] = before


def load_inline(name, cpp_sources, cuda_sources, functions, flags=()):
    """load_inline's arguments -> an object with one method per function, each taking and returning plain values."""
    declarations = "\n".join([cpp_sources] if isinstance(cpp_sources, str) else cpp_sources)
    source = "\n".join([cuda_sources] if isinstance(cuda_sources, str) else cuda_sources)
    signatures = {f: signature(declarations, f) for f in functions}
    shims = [f'extern "C" __attribute__((visibility("default"))) {ret} emu_entry_{f}('
             + ", ".join(f"{t} a{i}" for i, t in enumerate(args)) + f") {{ return {f}("
             + ", ".join(f"a{i}" for i in range(len(args))) + "); }" for f, (ret, args) in signatures.items()]
    return Kernels(compile_library(name, translate(source) + "\n" + "\n".join(shims), flags), signatures)


def signature(declarations: str, function: str):
    """('int', ['int64_t', 'bool', ...]) of `function`'s declaration: plain C types only."""
    m = re.search(rf"([\w:]+)\s+{function}\s*\(([^)]*)\)\s*;", declarations)
    if m is None:
        raise EmulatorError(f"{function} is not declared in {declarations!r}")
    args = [re.sub(r"\s*\w+$", "", a.strip()) for a in m[2].split(",") if a.strip()]
    if any(t not in C_TYPES for t in [m[1], *args]):
        raise EmulatorError(f"{function}({m[2]}) -> {m[1]}: the emulator binds entry points of plain C types "
                            f"({', '.join(C_TYPES)}), e.g. tensors as int64_t addresses")
    return m[1], args


def translate(source: str) -> str:
    """The CUDA source as C++ the header can run; every line keeps its number, for error messages."""
    source = re.sub(r"(?P<kernel>[\w:]+(?:<[^;{}]*?>)?)\s*<<<(?P<config>.*?)>>>",
                    lambda m: f'::emu::launcher("{m["kernel"]}", {m["kernel"]}, {m["config"]})', source, flags=re.S)
    source = re.sub(r"__global__\s+void\b[^;{]*?\{", lambda m: m[0] + " ::emu::entered(__PRETTY_FUNCTION__);", source)
    source = re.sub(r"extern\s+__shared__\s+(?:(?:__align__|alignas)\s*\(\w+\)\s*)?([^;\[]*?)\s*(\w+)\s*\[\s*\]\s*;",
                    r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_shared());", source)
    source = re.sub(r"__shared__\s+([^;{}]*?)\s*;",
                    lambda m: f"{m[0]} ::emu::poison_shared(&{shared_name(m[1])}, sizeof({shared_name(m[1])}));",
                    source)
    return re.sub(r"\b(?:asm|__asm__)\s*(?:volatile\s*|__volatile__\s*)?\(", "EMU_ASM(", source)


def shared_name(declaration: str) -> str:  # "float table[ROWS][1 << BITS]" -> "table"
    return re.findall(r"\w+", declaration.split("[")[0])[-1]


def compile_library(name: str, source: str, flags=()) -> Path:
    """g++ -> a shared library, kept in CACHE under the hash of everything that went into it."""
    key = hashlib.sha256("\0".join([source, (INCLUDE / "cuda_emu.h").read_text(), CXX, *FLAGS, *flags]).encode())
    library = CACHE / f"{name}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cu, obj, so = Path(tmp) / f"{name}.cu", Path(tmp) / f"{name}.o", Path(tmp) / f"{name}.so"
        cu.write_text(source)
        # Compiled and linked apart: linking with -fsanitize would pull in libubsan, whose handlers the header replaces.
        for command in ([CXX, *FLAGS, *flags, "-x", "c++", "-c", str(cu), "-o", str(obj)],
                        [CXX, "-shared", "-pthread", str(obj), "-o", str(so)]):
            r = subprocess.run(command, capture_output=True, text=True)
            if r.returncode != 0:
                raise EmulatorError(f"g++ could not build {name} for the emulator:\n{r.stderr[-6000:]}")
        os.replace(so, library)
    return library


class Kernels:
    """A built library's entry points as methods; each raises the error the emulator recorded during its call."""

    def __init__(self, path: Path, signatures: dict):
        self._library = ctypes.CDLL(str(path))
        self._library.emu_take_error.argtypes = [ctypes.c_char_p, ctypes.c_int]
        for name, (ret, args) in signatures.items():
            entry = getattr(self._library, f"emu_entry_{name}")
            entry.restype, entry.argtypes = C_TYPES[ret], [C_TYPES[t] for t in args]
            setattr(self, name, self._checked(entry))

    def _checked(self, entry):
        def call(*args):
            result = entry(*args)
            message = ctypes.create_string_buffer(4096)
            if self._library.emu_take_error(message, len(message)):
                raise EmulatorError(message.value.decode())
            return result
        return call


# ---------------------------------------------------------------------------------------------------------------
# For the kernel tests: one test body, two backends.

class Backend:
    """Where a kernel test runs: "emulator" (CPU tensors, every launch under each schedule in turn) or "cuda"."""

    def __init__(self, name: str, device: str, schedules):
        self.name, self.device, self.schedules = name, device, schedules

    def one_schedule(self, i: int) -> "Backend":
        """This backend with only the i-th schedule (taking turns), for tests too slow to emulate three times."""
        return Backend(self.name, self.device, [self.schedules[i % len(self.schedules)]])

    def results(self, compute):
        """compute() (which launches kernels into fresh outputs and returns one) under every schedule; the results
        must be bit for bit the same, or the kernel has a race. Returns the first."""
        outs = []
        for name in self.schedules:
            with schedule(name) if name else contextlib.nullcontext():
                outs.append(compute())
        for name, out in zip(self.schedules[1:], outs[1:]):
            assert bits(out).equal(bits(outs[0])), f"{name} gives another result than {self.schedules[0]}: a race"
        return outs[0]


def bits(t: torch.Tensor) -> torch.Tensor:  # compares NaNs too
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]) if t.is_floating_point() else t


@contextlib.contextmanager
def emulated(module, kernels):
    """`module` running `kernels` (a build of its source) on CPU tensors: the Backend its kernel tests take."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "kernels", lambda: kernels)
        patch.setattr(module, "KERNEL_DEVICE", "cpu")
        yield Backend("emulator", "cpu", list(SCHEDULES))


def backend_fixture(module):
    """A module-scoped fixture over the backends of `module`'s kernels: "emulator" (its source built by build(),
    installed while the test module uses it) and "cuda" (marked cuda: skipped without a GPU, run by
    scripts/gpu_check.sh's -m cuda)."""
    @pytest.fixture(scope="module", params=["emulator", pytest.param("cuda", marks=pytest.mark.cuda)])
    def backend(request):
        if request.param == "cuda":
            yield Backend("cuda", "cuda", [None])
        else:
            with emulated(module, build(module)) as emulator:
                yield emulator
    return backend
