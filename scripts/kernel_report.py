"""How fast can the decode GEMV kernels be? A static model read from their machine code: no GPU needed.

    python scripts/kernel_report.py                                   # every GEMV instance, H100/H200 and A100
    python scripts/kernel_report.py --kernels int4 anyprec --tokens 1 2 8 --gpus H100 H200 --mix
    python scripts/kernel_report.py --json > report.json              # one record per instance and architecture

Each kernel source (the CUDA_SOURCE strings of quantize.py and anyprec.py, imported at run time) is compiled once per
architecture with nvcc -cubin and disassembled with cuobjdump. For every template instance that KERNELS lists, the
report finds the main loop in the SASS and prints registers, spills, resident warps per SM, thread-instructions per
weight byte and the issue ceiling they imply, the weight loads in flight, and, per layer shape, the predicted
fraction of HBM bandwidth and speed-up over a bf16 GEMV. The method is ../shared/notes/kernel-analysis.md. It is a
model: the GPU has the last word, and only GPU measurements go into README's speed tables.
"""
import argparse
import collections
import functools
import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the kernels' modules: quantize, anyprec
NOTE = "static model from SASS, not a measurement"

# ---------------------------------------------------------------------------------------------------------------
# Hardware. Every SM of sm_80 and sm_90 has 4 schedulers that each issue one warp-instruction per clock, 65536
# registers allocated per warp in units of 256, at most 64 warps and 32 blocks, and reserves 1 KB of shared memory
# per block (CUDA's occupancy calculator). "HBM" below is what a good device copy reaches, not the datasheet peak.


@dataclass(frozen=True)
class GPU:
    arch: str
    sms: int
    clock: float      # Hz, sustained under load (boost is higher: 1.98 GHz on H100/H200)
    hbm_peak: float   # bytes/s, datasheet
    hbm: float        # bytes/s, achievable copy: 100% in this report
    smem_per_sm: int  # bytes; a block may use 1 KB less
    mma_per_clock: float  # mma.sync.m16n8k16 (4096 flops) an SM retires a clock, bf16/fp16 in, fp32 accumulators
    matmul_flops: float   # bf16 dense peak of the tensor cores at `clock`, with the best instruction (the bf16 bound)


# Tensor cores: an A100 SM does 1024 bf16 fma a clock (0.5 m16n8k16); an H100/H200 SM 2048 with wgmma (1 a clock), of
# which mma.sync is assumed to reach 2/3 (microbenchmarks of Hopper find ~60-70%).
GPUS = {  # H100 SXM5 80GB HBM3, copy measured (cuda-on-cpu.md); H200 SXM 141GB HBM3e, copy assumed ~88% of peak as
    # on H100; A100 SXM4 80GB HBM2e, clock = boost, copy assumed
    "H100": GPU("sm_90a", 132, 1.75e9, 3.35e12, 3.0e12, 228 * 1024, 2 / 3, 132 * 4096 * 1.75e9),
    "H200": GPU("sm_90a", 132, 1.75e9, 4.8e12, 4.2e12, 228 * 1024, 2 / 3, 132 * 4096 * 1.75e9),
    "A100": GPU("sm_80", 108, 1.41e9, 2.04e12, 1.7e12, 164 * 1024, 0.5, 108 * 2048 * 1.41e9),
}
ISSUE_PER_CLOCK = 4 * 32  # thread-instructions per SM: 4 schedulers x one warp-instruction of 32 lanes
LATENCY = 700e-9          # s, DRAM latency under load (assumed); Little's law: bytes in flight = latency x bandwidth
REGISTERS, REG_UNIT, MAX_WARPS, MAX_BLOCKS, SMEM_RESERVED = 65536, 256, 64, 32, 1024


def issue_rate(gpu: GPU) -> float:
    return gpu.sms * ISSUE_PER_CLOCK * gpu.clock  # ~29.6e12 thread-instructions/s on H100/H200


def needed_in_flight(gpu: GPU) -> float:
    return LATENCY * gpu.hbm / gpu.sms  # bytes per SM: ~22 KB on H200


def bf16_seconds_per_weight(gpu: GPU, tokens: int) -> float:
    """The bf16 matmul's lower bound, per weight: its 2 bytes at the copy rate, or its 2 x tokens flops at the tensor
    cores' peak, whichever takes longer (an ideal cuBLAS; at 64 tokens on H200 still the bytes, 4.5x over the flops)."""
    return max(2 / gpu.hbm, 2 * tokens / gpu.matmul_flops)


# ---------------------------------------------------------------------------------------------------------------
# The kernels: one entry per GEMV template, and a new kernel is one more entry. `instance` maps a template
# instance's arguments (parsed from its mangled name) to its row, or None to leave it out; `weight_load` matches
# the SASS opcode of the loads that read the weight (the other loads read activations, scales or tables); `warps`
# and `blocks` give the launch from the source's constexpr ints, so that a layer shape gives its warps per SM;
# `extra_bytes` counts memory traffic per weight beyond the weight and its scales (a split-K workspace).


@dataclass(frozen=True)
class Kernel:
    names: tuple                # the rows' "kernel" labels, for --kernels
    module: str                 # whose CUDA_SOURCE holds the kernel
    symbol: str                 # the __global__ function template
    weight_load: str            # regex, full match on the opcode
    instance: Callable          # template args -> {"kernel": name, "bits": b, "tokens": m, ...} or None
    warps: Callable             # (instance, consts) -> warps per block
    blocks: Callable            # (instance, consts, N, K, GPU) -> blocks launched for an N x K weight
    bytes_per_weight: Callable  # (instance, K) -> bytes read per weight, scales and tables included
    dynamic_smem: Callable = lambda i, c: 0  # (instance, consts) -> bytes per block given at launch
    sources: tuple = ("CUDA_SOURCE",)  # the module's strings that, joined, hold the kernel (and its helpers)
    extra_bytes: Callable = lambda i, N, K, gpu: 0  # (instance, N, K, GPU) -> more bytes of HBM traffic per weight


INT4_GROUPSIZE = 128  # int4's scales: 4 bytes per group


def quantize_instance(args):  # gemv_kernel<M, T, INT4>; fp16 instances differ only in their magic constants
    M, dtype, int4 = args
    if dtype == "__nv_bfloat16":
        return dict(kernel="int4" if int4 else "int8", bits=4 if int4 else 8, tokens=M)


def anyprec_instance(args):  # anyprec_gemv_kernel<BITS, FP16, TILES>; one instance serves 1..8 tokens (mma's n = 8)
    bits, fp16, tiles = args
    if not fp16:
        return dict(kernel="anyprec", bits=bits, tokens=1, rows=16 * tiles)


def anyprec_table_bytes(bits, tiles, warps):  # anyprec.CUDA_SOURCE's Tables<BITS, bf16, TILES>::BYTES
    stripes, regions = (0x78, 2) if bits == 3 else (2**bits, tiles)  # 3 bits: hi and lo pair tables
    return max(regions * 256 * stripes, warps * tiles * 16 * 8 * 4)


def mma_instance(args):  # mma_kernel<TT, T, INT4>: TT tiles of 8 tokens
    TT, dtype, int4 = args
    if dtype == "__nv_bfloat16":
        return dict(kernel="int4-mma" if int4 else "int8-mma", bits=4 if int4 else 8, tokens=8 * TT)


def mma_tile(i):
    return importlib.import_module("quantize").mma_tile(i["tokens"], i["bits"] == 4)


def mma_splits(i, N, K, gpu):
    return importlib.import_module("quantize").mma_splits(N, K, i["tokens"], i["bits"] == 4, gpu.sms)


KERNELS = [
    Kernel(names=("int8", "int4"), module="quantize", symbol="gemv_kernel",
           weight_load=r"LDG\.E\.NA\.128.*",  # ld.global.nc.L1::no_allocate; x and scales are plain __ldg
           instance=quantize_instance,
           warps=lambda i, c: c["WARPS"],
           blocks=lambda i, c, N, K, gpu: -(-N // (16 * c["TILES"])),  # a block: 16-row mma tiles, warps split K
           bytes_per_weight=lambda i, K: 1 + 2 / K if i["bits"] == 8 else 0.5 + 4 / INT4_GROUPSIZE),
    Kernel(names=("anyprec",), module="anyprec", symbol="anyprec_gemv_kernel",
           weight_load=r"LDG\.E\.NA\.128.*",  # the planes, ld.global.nc.L1::no_allocate; x is plain __ldg
           instance=anyprec_instance,
           warps=lambda i, c: c["WARPS"],
           blocks=lambda i, c, N, K, gpu: -(-N // i["rows"]),  # a block: 16-row mma tiles, its warps split K
           bytes_per_weight=lambda i, K: i["bits"] / 8 + 2 ** i["bits"] * 2 / K,  # planes + fp16 table per row
           dynamic_smem=lambda i, c: anyprec_table_bytes(i["bits"], i["rows"] // 16, c["WARPS"])),
    # The tensor-core kernel (quantize.MMA_SOURCE): an instance per 8 tokens, 1..8 tokens run the 8-token one. Its
    # weight copies are cp.async.cg (LDGSTS.E.BYPASS), the activations' and scales' cp.async.ca. K is split over
    # mma_splits blocks a column of 256 rows, whose fp32 partial sums are written (counted here) and read back.
    Kernel(names=("int8-mma", "int4-mma"), module="quantize", symbol="mma_kernel", sources=("CUDA_SOURCE", "MMA_SOURCE"),
           weight_load=r"LDGSTS\.E\.BYPASS.*\.128",
           instance=mma_instance,
           warps=lambda i, c: c["MMA_WARPS"],
           blocks=lambda i, c, N, K, gpu: -(-N // mma_tile(i)["rows"]) * mma_splits(i, N, K, gpu),
           bytes_per_weight=lambda i, K: 1 + 2 / K if i["bits"] == 8 else 0.5 + 4 / INT4_GROUPSIZE,
           dynamic_smem=lambda i, c: mma_tile(i)["smem"],
           extra_bytes=lambda i, N, K, gpu: 4 * i["tokens"] * s / K if (s := mma_splits(i, N, K, gpu)) > 1 else 0),
]

# ---------------------------------------------------------------------------------------------------------------
# Compiling and disassembling.


@functools.cache
def find_tool(name: str) -> str:
    wheels = Path(sysconfig.get_paths()["purelib"]).glob(f"nvidia/*/bin/{name}")  # nvidia-cuda-cuobjdump's wheel
    for path in [shutil.which(name), *sorted(glob.glob(f"/usr/local/cuda*/bin/{name}")), *map(str, wheels)]:
        if path and os.access(path, os.X_OK):
            return path
    hint = "install the CUDA toolkit" if name == "nvcc" else "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm"
    sys.exit(f"error: {name} not found: {hint}")


def include_flags(folder: Path) -> list:
    """nvcc's -I flags for the kernel sources: torch's headers and Python's, and a stub folder made in `folder`."""
    from torch.utils.cpp_extension import include_paths
    # The CPU wheel of torch lacks this generated header; an empty one compiles (../shared/notes/cuda-on-cpu.md).
    (folder / "stub/c10/cuda/impl").mkdir(parents=True, exist_ok=True)
    (folder / "stub/c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n")
    return [f"-I{p}" for p in [folder / "stub", *include_paths(), sysconfig.get_paths()["include"]]]


def source_text(module: str, names: tuple) -> str:
    return "\n".join(getattr(importlib.import_module(module), name) for name in names)


@functools.cache
def compile_source(module: str, arch: str, names: tuple = ("CUDA_SOURCE",)) -> dict:
    """{"log": ptxas -v, "sass": cuobjdump -sass, "cubin": bytes} for `module`'s strings `names`, joined as load_inline
    joins them, with its flags."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    source = source_text(module, names)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "k.cu").write_text(source)
        cmd = [find_tool("nvcc"), "-cubin", f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas", "-v",
               *COMMON_NVCC_FLAGS, *include_flags(tmp), str(tmp / "k.cu"), "-o", str(tmp / "k.cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: nvcc failed on {module}.{'+'.join(names)} for {arch}:\n{r.stderr[-3000:]}")
        # cuobjdump -sass runs nvdisasm, which it finds on PATH, beside itself or at NVDISASM_PATH
        env = {**os.environ, "NVDISASM_PATH": str(Path(find_tool("nvdisasm")).parent)}
        sass = subprocess.run([find_tool("cuobjdump"), "-sass", str(tmp / "k.cubin")], capture_output=True,
                              text=True, check=True, env=env).stdout
        return {"log": r.stdout + r.stderr, "sass": sass, "cubin": (tmp / "k.cubin").read_bytes()}


def ptxas_resources(log: str) -> dict:
    """{mangled name: {"registers", "spills" (bytes stored and loaded), "smem" (static bytes)}} from ptxas -v."""
    found, name = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name = m[1]
            found[name] = {"registers": 0, "spills": 0, "smem": 0}
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            found[name]["spills"] = int(m[1]) + int(m[2])
        elif m := re.search(r"Used (\d+) registers", line):
            found[name]["registers"] = int(m[1])
            found[name]["smem"] = int(s[1]) if (s := re.search(r"(\d+) bytes smem", line)) else 0
    return found


@dataclass(frozen=True)
class Inst:
    addr: int
    op: str
    operands: str


def functions(sass: str) -> dict:
    """{mangled name: [Inst]} from cuobjdump -sass."""
    line = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
    found = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = chunk.split("\n", 1)
        found[name.strip()] = [Inst(int(a, 16), op, ops.strip()) for a, op, ops in line.findall(body)]
    return found


def template_args(mangled: str, symbol: str):
    """The template arguments of `symbol`<...> in an Itanium-mangled name, or None: ints, bools and type names."""
    m = re.search(rf"{len(symbol)}{symbol}I(.*)", mangled)
    if not m:
        return None
    rest, args, builtin = m[1], [], {"f": "float", "i": "int", "j": "unsigned", "h": "uint8_t", "t": "uint16_t"}
    while rest and rest[0] != "E":
        if m := re.match(r"L([a-z])(n?)(\d+)E", rest):  # a literal: Li8E, Lb1E, Lin1E
            value = int(m[3]) * (-1 if m[2] else 1)
            args.append(bool(value) if m[1] == "b" else value)
        elif m := re.match(r"(\d+)", rest):  # a named type: 13__nv_bfloat16
            n = int(m[1])
            args.append(rest[len(m[1]):len(m[1]) + n])
            rest = rest[len(m[1]) + n:]
            continue
        else:
            m = re.match(".", rest)
            args.append(builtin.get(m[0], m[0]))
        rest = rest[m.end():]
    return tuple(args)


# ---------------------------------------------------------------------------------------------------------------
# Reading the SASS: the main loop, and how many of its weight loads are in flight together.


def main_loop(insts: list, is_weight) -> list:
    """The hot loop: from a backward branch's target to the last branch back to it, innermost among the loops that
    contain weight loads; between siblings (an unrolled loop and its remainder) the one with the most of them."""
    index = {inst.addr: n for n, inst in enumerate(insts)}
    ends = {}
    for n, inst in enumerate(insts):
        target = re.search(r"0x([0-9a-f]+)$", inst.operands)
        if inst.op.startswith("BRA") and target and index.get(int(target[1], 16), n + 1) <= n:
            ends[index[int(target[1], 16)]] = n
    loads = {span: sum(map(is_weight, insts[span[0]:span[1] + 1])) for span in ends.items()}
    loads = {span: count for span, count in loads.items() if count}
    innermost = [s for s in loads if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in loads)]
    if not innermost:
        return []
    start, end = max(innermost, key=loads.get)
    return insts[start:end + 1]


def registers(inst: Inst) -> list:
    """The registers an instruction names, in order; R4.64 is R4 and R5, and a .128 or .64 access widens each."""
    width = 4 if ".128" in inst.op else 2 if ".64" in inst.op else 1
    found = []
    for n, pair in re.findall(r"\bR(\d+)(\.64)?\b", inst.operands):
        found.append(set(range(int(n), int(n) + (2 if pair else width))))
    return found


def in_flight(loop: list, is_weight) -> dict:
    """Weight loads per lane and loop iteration, and the DRAM latencies a warp waits per iteration ("trips"), from
    a few laps of the loop in which instructions take no time and a load takes one latency: an instruction that
    names a pending load's register waits for it (and then holds everything issued before it). All loads issued
    before the first use: one trip; ptxas sinking loads below a first use: more; loads for the next iteration: less.
    weight bytes / trips is the per-lane figure Little's law needs. cp.async (LDGSTS) writes shared memory:
    DEPBAR.LE SB0, n waits for all but the newest n commit groups (LDGDEPBAR)."""
    laps, now, group, first, issued = 8, 0.0, 0, None, 0
    pending = []  # (time it arrives, registers, commit group)
    for lap in range(laps):
        if lap == laps // 2:
            start = now  # from here on, the steady state
        for inst in loop:
            named = set().union(*registers(inst))
            waits = [t for t, regs, _ in pending if regs & named]
            if inst.op.startswith("DEPBAR") and (m := re.search(r"SB0, (?:0x)?([0-9a-f]+)", inst.operands)):
                waits += [t for t, _, g in pending if g is not None and g < group - int(m[1], 16)]
            if waits:
                now = max(now, *waits)
                pending = [p for p in pending if p[0] > now]
                first = issued if first is None else first
            group += inst.op.startswith("LDGDEPBAR")
            if is_weight(inst):
                cp_async = inst.op.startswith("LDGSTS")
                pending.append((now + 1, set() if cp_async else registers(inst)[0], group if cp_async else None))
                issued += 1
    width = [16 if ".128" in i.op else 8 if ".64" in i.op else 4 for i in loop if is_weight(i)]
    trips = (now - start) / (laps - laps // 2) or 1.0  # 0: loads never waited for, as if one trip
    return {"weight_loads": len(width), "weight_bytes": sum(width), "trips": trips,
            "loads_before_first_use": issued if first is None else first}


# ---------------------------------------------------------------------------------------------------------------
# The model.


def resident_warps(regs: int, smem: int, warps: int, gpu: GPU) -> int:
    if smem > gpu.smem_per_sm - SMEM_RESERVED:
        return 0  # cannot launch
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    blocks = min(MAX_WARPS // warps, MAX_BLOCKS, REGISTERS // (per_warp * warps),
                 gpu.smem_per_sm // (smem + SMEM_RESERVED))
    return blocks * warps


def predict(row: dict, gpu: GPU, shapes: list, kernel: Kernel, consts: dict) -> dict:
    """Ceilings, bytes in flight per SM and bandwidth for one GPU and each N x K shape. The issue and tensor ceilings
    bound the weight bytes a second; HBM and the bytes in flight bound all the bytes (scales, workspace)."""
    ceiling = issue_rate(gpu) / row["inst_per_byte"]
    tensor = gpu.sms * gpu.clock * gpu.mma_per_clock / row["mma_per_byte"] if row["mma_per_byte"] else float("inf")
    out = {"ceiling_tbs": ceiling / 1e12, "tensor_tbs": tensor / 1e12,
           "needed_kb_per_sm": needed_in_flight(gpu) / 1024, "shapes": {}}
    resident = resident_warps(row["registers"], row["smem"], row["warps_per_block"], gpu)
    for N, K in shapes:
        # The layer may give each SM fewer warps than fit: 4096 rows at 16 a block is 256 blocks, ~1.9 per SM.
        warps = min(resident, kernel.blocks(row, consts, N, K, gpu) * row["warps_per_block"] / gpu.sms)
        in_flight_sm = row["weight_bytes"] / row["trips"] * 32 * warps
        total = kernel.bytes_per_weight(row, K) + kernel.extra_bytes(row, N, K, gpu)
        seconds = max(row["bits"] / 8 / min(ceiling, tensor),
                      total / min(gpu.hbm, in_flight_sm * gpu.sms / LATENCY))
        out["shapes"][f"{N}x{K}"] = {
            "warps_per_sm": warps, "kb_in_flight_per_sm": in_flight_sm / 1024, "bytes_per_weight": total,
            "hbm_fraction": min(1.0, total / seconds / gpu.hbm),  # 1 when HBM is the bound (not 1 + rounding)
            # against bf16's bound at as many tokens: its bytes at the copy rate, or its flops at peak
            "speedup_vs_bf16": bf16_seconds_per_weight(gpu, row["tokens"]) / seconds}
    return out


def analyse(kernel: Kernel, arch: str, gpus: list, shapes: list, selected) -> list:
    """One record per selected instance of `kernel` compiled for `arch`."""
    compiled = compile_source(kernel.module, arch, kernel.sources)
    source = source_text(kernel.module, kernel.sources)
    consts = {k: int(v) for k, v in re.findall(r"constexpr int (\w+) = (\d+);", source)}  # WARPS, ROWS, ...
    resources, code = ptxas_resources(compiled["log"]), functions(compiled["sass"])
    weight_load = re.compile(kernel.weight_load)
    is_weight = lambda inst: bool(weight_load.fullmatch(inst.op))
    rows = []
    for name, insts in code.items():
        args = template_args(name, kernel.symbol)
        row = kernel.instance(args) if args else None
        if not row or not selected(row):
            continue
        loop = main_loop(insts, is_weight)
        assert loop, f"no loop with weight loads in {name} for {arch}: is KERNELS' weight_load right?"
        row.update(arch=arch, function=name, **resources[name], warps_per_block=kernel.warps(row, consts),
                   dynamic_smem=kernel.dynamic_smem(row, consts),
                   loop={"start": loop[0].addr, "end": loop[-1].addr, "instructions": len(loop),
                         "mix": dict(collections.Counter(i.op.split(".")[0] for i in loop).most_common())},
                   **in_flight(loop, is_weight))
        row["smem"] += row.pop("dynamic_smem")
        row["resident_warps"] = resident_warps(row["registers"], row["smem"], row["warps_per_block"], GPUS[gpus[0]])
        # a warp-instruction is 32 thread-instructions for the 32 lanes' weight bytes: per lane, they cancel
        row["inst_per_byte"] = len(loop) / row["weight_bytes"]
        row["mma_per_byte"] = sum(i.op.startswith("HMMA.16816") for i in loop) / (32 * row["weight_bytes"])
        row["resident_blocks"] = row["resident_warps"] // row["warps_per_block"]
        row["gpus"] = {g: predict(row, GPUS[g], shapes, kernel, consts) for g in gpus}
        rows.append(row)
    return sorted(rows, key=lambda r: (r["kernel"], r["bits"], r["tokens"]))


# ---------------------------------------------------------------------------------------------------------------
# Output.


def table(rows: list, gpus: list, shapes: list) -> list:
    """Aligned lines for one architecture's rows: a header over each shape's columns, then one line per instance."""
    head = ["kernel", "bits", "M", "regs", "spill", "warps", "blk", "smem", "inst/B", *(f"TB/s {g}" for g in gpus),
            f"TC {gpus[-1]}", "loads", "trips", "B/lane"]
    groups = [""] * len(head)
    for N, K in shapes:
        cols = ["KB/SM", *(f"%{g}" for g in gpus), f"x bf16 {gpus[-1]}"]
        groups += [f"{N}x{K}"] + [""] * (len(cols) - 1)
        head += cols
    lines = [groups, head]
    for r in rows:
        tensor = r["gpus"][gpus[-1]]["tensor_tbs"]
        line = [r["kernel"], r["bits"], r["tokens"], r["registers"], r["spills"], r["resident_warps"],
                r["resident_blocks"], r["smem"], f"{r['inst_per_byte']:.2f}",
                *(f"{r['gpus'][g]['ceiling_tbs']:.2f}" for g in gpus), "-" if tensor == float("inf") else f"{tensor:.2f}",
                f"{r['weight_loads']}x{r['weight_bytes'] // r['weight_loads']}B", f"{r['trips']:.2g}",
                f"{r['weight_bytes'] / r['trips']:.0f}"]
        for N, K in shapes:
            s = {g: r["gpus"][g]["shapes"][f"{N}x{K}"] for g in gpus}
            line += [f"{s[gpus[0]]['kb_in_flight_per_sm']:.1f}", *(f"{100 * s[g]['hbm_fraction']:.0f}" for g in gpus),
                     f"{s[gpus[-1]]['speedup_vs_bf16']:.2f}"]
        lines.append(line)
    widths = [max(len(str(line[c])) for line in lines) for c in range(len(head))]
    return ["  ".join(str(v).rjust(w) if c else str(v).ljust(w) for c, (v, w) in enumerate(zip(line, widths)))
            .rstrip() for line in lines]


def save(jobs: list, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    for kernel, arch in jobs:
        compiled = compile_source(kernel.module, arch, kernel.sources)
        stem = ".".join([kernel.module, *kernel.sources[1:], arch])
        (folder / f"{stem}.log").write_text(compiled["log"])
        (folder / f"{stem}.sass").write_text(compiled["sass"])
        (folder / f"{stem}.cubin").write_bytes(compiled["cubin"])


def headline(gpus: list) -> str:
    release = re.search(r"release ([\d.]+)", subprocess.run([find_tool("nvcc"), "--version"], capture_output=True,
                                                            text=True).stdout)
    return (f"{NOTE} (nvcc {release[1] if release else '?'} -O3; DRAM latency {LATENCY * 1e9:.0f} ns; "
            + "; ".join(f"{g}: {GPUS[g].sms} SMs at {GPUS[g].clock / 1e9:.2f} GHz, HBM {GPUS[g].hbm / 1e12:.1f} "
                        f"of {GPUS[g].hbm_peak / 1e12:.2f} TB/s" for g in gpus) + ")")


def shape(text: str) -> tuple:
    N, K = map(int, text.lower().split("x"))  # argparse turns a ValueError into a usage message
    return N, K


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [n for k in KERNELS for n in k.names]
    parser.add_argument("--kernels", nargs="+", default=names, choices=names)
    parser.add_argument("--tokens", nargs="+", type=int, help="the instances' token counts M (default: all)")
    parser.add_argument("--bits", nargs="+", type=int, help="widths (default: all)")
    parser.add_argument("--gpus", nargs="+", default=list(GPUS), choices=list(GPUS), help="and so architectures")
    parser.add_argument("--shapes", nargs="+", type=shape, default=[(4096, 4096), (4096, 11008)],
                        help="weights as NxK (out x in features, as nn.Linear stores them)")
    parser.add_argument("--mix", action="store_true", help="also print each main loop's opcodes per weight byte")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    parser.add_argument("--save_dir", type=Path, help="keep each source's .cubin, .sass and ptxas log here")
    args = parser.parse_args(argv)
    shapes = args.shapes
    selected = lambda r: (r["kernel"] in args.kernels and (not args.tokens or r["tokens"] in args.tokens)
                          and (not args.bits or r["bits"] in args.bits))
    archs = {a: [g for g in args.gpus if GPUS[g].arch == a] for a in dict.fromkeys(GPUS[g].arch for g in args.gpus)}
    for tool in ("nvcc", "cuobjdump", "nvdisasm"):
        find_tool(tool)  # before a minute of compiling
    jobs = [(k, a) for a in archs for k in KERNELS if set(k.names) & set(args.kernels)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # one nvcc per source and architecture, all at once
        list(pool.map(lambda job: compile_source(job[0].module, job[1], job[0].sources), jobs))
    rows = {a: [] for a in archs}
    for kernel, arch in jobs:
        rows[arch] += analyse(kernel, arch, archs[arch], shapes, selected)
    if args.save_dir:
        save(jobs, args.save_dir)
    if args.json:
        print(json.dumps({"note": headline(args.gpus), "rows": [r for a in archs for r in rows[a]]}, indent=1))
        return
    print(headline(args.gpus))
    print("inst/B: thread-instructions of the main loop per weight byte; warps, blk: resident per SM; smem: bytes a "
          "block; TC: the tensor cores' ceiling on weight bytes (mma.sync); loads: weight loads a lane issues per loop "
          "iteration; trips: DRAM latencies a warp waits per iteration; B/lane: bytes it has in flight; KB/SM: with "
          "the warps an SM holds and the layer gives it; %: of HBM; x bf16: speed-up over bf16's matmul at as many "
          "tokens, bounded by its 2 bytes a weight at 100% or its flops at the tensor cores' peak")
    for arch, gpus in archs.items():
        need = ", ".join(f"{g} {needed_in_flight(GPUS[g]) / 1024:.1f} KB" for g in gpus)
        print(f"\n{arch}: {issue_rate(GPUS[gpus[0]]) / 1e12:.1f}e12 thread-instructions/s; needed in flight per SM: "
              f"{need}; time = max(weight bytes / min(issue, TC), all bytes / min(KB/SM x SMs / latency, HBM))")
        print("\n".join(table(rows[arch], gpus, shapes)))
        for r in rows[arch] if args.mix else []:
            mix = " ".join(f"{op} {n / r['weight_bytes']:.2f}" for op, n in r["loop"]["mix"].items())
            print(f"  {r['kernel']} {r['bits']}-bit M={r['tokens']}: {mix}")


if __name__ == "__main__":
    main()
