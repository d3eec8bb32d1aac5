"""scripts/kernel_report.py: its load-in-flight model on hand-written SASS, then the whole tool on one kernel instance
(int8 GEMV, one token, sm_90a), its figures checked against cuobjdump, ptxas and the raw disassembly."""
import json
import re
import subprocess

import pytest

import kernel_report
from kernel_report import Inst, in_flight, main_loop
from nvcc import kernel_report as ptxas_report, needs_nvcc


def sass(*lines):
    """Instructions 16 bytes apart, like cuobjdump's: 'OPCODE operands'."""
    return [Inst(16 * n, *(line.split(" ", 1) + [""])[:2]) for n, line in enumerate(lines)]


def is_weight(inst):
    return inst.op.startswith(("LDG.E.NA.128", "LDGSTS"))


@pytest.mark.parametrize("body, trips, first", [
    # both loads before the first use: one trip a lane and iteration
    (["LDG.E.NA.128 R4, desc[UR4][R2.64]", "LDG.E.NA.128 R8, desc[UR4][R2.64+0x200]", "FFMA R0, R4, R8, R0"], 1, 2),
    # the second load sunk below the first use (what a `break` in the loop does): two trips
    (["LDG.E.NA.128 R4, desc[UR4][R2.64]", "FADD R0, R7, R0", "LDG.E.NA.128 R8, desc[UR4][R2.64+0x200]",
      "FADD R0, R9, R0"], 2, 1),
    # loaded for the next iteration, used at the top of this one: still one trip, the loads overlap the math
    (["FFMA R0, R4, R8, R0", "LDG.E.NA.128 R4, desc[UR4][R2.64]", "LDG.E.NA.128 R8, desc[UR4][R2.64+0x200]"], 1, 2),
    # cp.async, double-buffered: DEPBAR waits for the previous group only, two groups in flight
    (["LDGSTS.E.BYPASS.128 [R3], desc[UR4][R2.64]", "LDGSTS.E.BYPASS.128 [R3+0x200], desc[UR4][R2.64+0x200]",
      "LDGDEPBAR", "DEPBAR.LE SB0, 0x1", "LDS R5, [R6]"], 0.5, 4),
])
def test_in_flight_counts_dram_round_trips(body, trips, first):
    loop = main_loop(sass("MOV R1, RZ", *body, "BRA 0x10", "EXIT"), is_weight)
    assert [i.op for i in loop] == [line.split(" ")[0] for line in body] + ["BRA"]
    assert in_flight(loop, is_weight) == {"weight_loads": 2, "weight_bytes": 32, "trips": trips,
                                          "loads_before_first_use": first}


def test_template_args_from_mangled_names():
    name = "_ZN36_GLOBAL__N__a84282bc_4_q_cu_5e97309611gemv_kernelILi8E13__nv_bfloat16Lb1EEEvPKT0_PKhPKvPS2_iii"
    assert kernel_report.template_args(name, "gemv_kernel") == (8, "__nv_bfloat16", True)
    assert kernel_report.template_args(name, "anyprec_gemv_kernel") is None


def test_a_missing_disassembler_names_its_wheel():
    with pytest.raises(SystemExit, match="^error: no-such-disassembler not found: pip install nvidia-cuda-cuobjdump"):
        kernel_report.find_tool("no-such-disassembler")


@needs_nvcc
def test_report_on_int8_gemv_at_one_token(tmp_path, capsys):
    argv = ["--kernels", "int8", "--tokens", "1", "--gpus", "H200", "--save_dir", str(tmp_path)]
    kernel_report.main(argv)
    text = capsys.readouterr().out
    assert text.startswith("static model from SASS, not a measurement")
    kernel_report.main(argv + ["--json"])  # compiled once: the second run reuses the first's build
    [row] = json.loads(capsys.readouterr().out)["rows"]
    assert (row["kernel"], row["bits"], row["tokens"], row["arch"]) == ("int8", 8, 1, "sm_90a")

    # Registers: as cuobjdump reads them from the cubin and ptxas printed them; no spills.
    cuobjdump = kernel_report.find_tool("cuobjdump")
    usage = subprocess.run([cuobjdump, "-res-usage", tmp_path / "quantize.sm_90a.cubin"], capture_output=True,
                           text=True, check=True).stdout
    registers = int(re.search(re.escape(row["function"]) + r":\s+REG:(\d+)", usage)[1])
    ptxas = ptxas_report((tmp_path / "quantize.sm_90a.log").read_text())[(row["function"], "sm_90a")]
    assert row["registers"] == registers == ptxas["registers"] > 0
    assert row["spills"] == ptxas["spill_stores"] + ptxas["spill_loads"] == 0
    assert 0 < row["resident_warps"] <= 64 and row["resident_warps"] % row["warps_per_block"] == 0

    # The loop, in the raw SASS: it ends with a branch back to its start and holds the 16-byte weight loads.
    function = (tmp_path / "quantize.sm_90a.sass").read_text().split(row["function"])[1].split("Function :")[0]
    code = [(int(a, 16), inst) for a, inst in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", function)]
    loop = [inst for a, inst in code if row["loop"]["start"] <= a <= row["loop"]["end"]]
    assert len(loop) == row["loop"]["instructions"] > 20
    assert re.search(rf"BRA {row['loop']['start']:#x}\s*$", loop[-1])
    inner = [int(t[1], 16) for a, inst in code if (t := re.search(r"BRA 0x([0-9a-f]+)", inst))
             and row["loop"]["start"] <= int(t[1], 16) <= a <= row["loop"]["end"]]
    assert inner == [row["loop"]["start"]]  # the innermost loop: no other branch back inside it
    weight_loads = [inst for inst in loop if "LDG.E.NA.128" in inst]
    assert len(weight_loads) == row["weight_loads"] >= 1 and row["weight_bytes"] == 16 * len(weight_loads)
    assert row["inst_per_byte"] == len(loop) / row["weight_bytes"] and 0.25 < row["inst_per_byte"] < 20

    # In flight: a trip per load at worst; KB per SM = bytes per trip x 32 lanes x warps on an SM.
    assert 0 < row["trips"] <= row["weight_loads"] and row["loads_before_first_use"] >= 1
    h200 = row["gpus"]["H200"]
    assert h200["ceiling_tbs"] == pytest.approx(132 * 4 * 32 * 1.75e9 / row["inst_per_byte"] / 1e12)
    for shape in h200["shapes"].values():
        assert 0 < shape["warps_per_sm"] <= row["resident_warps"]
        kb = row["weight_bytes"] / row["trips"] * 32 * shape["warps_per_sm"] / 1024
        assert shape["kb_in_flight_per_sm"] == pytest.approx(kb)
        bandwidth = min(h200["ceiling_tbs"] * 1e12, 4.2e12, kb * 1024 * 132 / 700e-9)
        assert shape["hbm_fraction"] == pytest.approx(bandwidth / 4.2e12) and 0 < shape["hbm_fraction"] <= 1
