"""Compile-check CUDA source on a machine without a GPU (../shared/notes/cuda-on-cpu.md): nvcc -c for sm_80 and
sm_90a in one run, returning ptxas's per-kernel register and spill report.

Kernel sources should include the light headers (<ATen/core/Tensor.h>, <c10/cuda/CUDAStream.h>,
<c10/cuda/CUDAGuard.h>), not <torch/extension.h>: the check then takes seconds, not minutes.
"""
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
ARCHS = ("80", "90a")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def compile_cuda(source: str, archs=ARCHS) -> str:
    """nvcc -c `source` for every arch; returns ptxas -v's report, or fails the test with nvcc's errors."""
    from kernel_report import include_flags  # scripts/, on the tests' path
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "kernels.cu").write_text(source)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        cmd = [NVCC, "-c", str(tmp / "kernels.cu"), "-o", str(tmp / "kernels.o"), "-std=c++17", "-O3",
               "-Xptxas", "-v", *gencode, *include_flags(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"nvcc failed:\n{r.stderr[-4000:]}")
        return r.stdout + r.stderr


def kernel_report(ptxas_log: str) -> dict:
    """{(kernel, arch): {"registers": n, "spill_stores": bytes, "spill_loads": bytes}} from ptxas -v."""
    report, current = {}, None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            current = m.groups()
            report[current] = {}
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            report[current].update(spill_stores=int(m[1]), spill_loads=int(m[2]))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            report[current]["registers"] = int(m[1])
    return report
