"""quantize.py: the formats, GPTQ, files, loading, the tiny model's perplexity, and (on a GPU) the kernels."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import quantize
from eval import calibration_windows, perplexity, stdlib_texts
from generate import generate, load_model
from model import ModelArgs, Transformer, linear_names
from nvcc import compile_cuda, kernel_report, needs_nvcc
from quantize import (GROUPSIZES, Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, gptq, quantize_int4,
                      quantize_int8, quantize_model, unpack_int4)
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "checkpoints/tiny-py/model.pth"
# dim 64 and ffn 96: every layer's width divides by 32, w2's (96) not by 64, so --groupsize 64 must be refused.
CONFIG = ModelArgs(block_size=128, vocab_size=512, n_layer=2, n_head=4, n_kv_heads=2, dim=64, intermediate_size=96)


def rows_of_scale(N, K):
    """Weights whose rows differ in scale by 100x, as real layers' do."""
    return torch.randn(N, K) * torch.logspace(-2, 0, N)[:, None]


@pytest.mark.parametrize("N,K", [(1, 16), (37, 80), (256, 512)])
def test_int8_round_trip(N, K):
    w = rows_of_scale(N, K)
    weight, scales = quantize_int8(w)
    assert weight.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (N,)
    assert (weight.abs().amax(dim=1) >= 126).all()  # each row's largest weight uses the full range
    err = (dequantize_int8(weight, scales) - w).abs()
    assert (err <= 0.51 * scales.float()[:, None] + 1e-7).all()  # half a step (bf16 scale rounding: the 0.01)


@pytest.mark.parametrize("groupsize", GROUPSIZES)
def test_int4_round_trip(groupsize):
    N, K = 48, 512
    w = rows_of_scale(N, K) + torch.randn(N, 1)  # groups off centre: the zero must follow
    weight, sz = quantize_int4(w, groupsize)
    assert weight.shape == (N, K // 2) and weight.dtype == torch.uint8
    assert sz.shape == (N, K // groupsize, 2) and sz.dtype == torch.bfloat16
    codes = unpack_int4(weight)
    assert codes.max() == 15 and codes.min() == 0 and torch.equal(quantize.pack_int4(codes), weight)
    step, zero = sz.float().repeat_interleave(groupsize, dim=1).unbind(-1)
    # Half a step, but at the ends of a group's range also the bf16 rounding of its zero (2^-9 relative).
    assert ((dequantize_int4(weight, sz) - w).abs() <= 0.52 * step + 2**-9 * zero.abs() + 1e-6).all()
    # The layout, from first principles: byte 0 holds k = 0 in its low nibble and k = 1 in its high one.
    scale, zero = sz[:, 0].float().unbind(-1)
    first = ((w[:, :2] - zero[:, None]) / scale[:, None]).round().add(8).clamp(0, 15).to(torch.uint8)
    assert torch.equal(weight[:, 0] & 15, first[:, 0]) and torch.equal(weight[:, 0] >> 4, first[:, 1])


def test_pytorch_paths_compute_the_dequantized_linear():
    """The ops off the kernels' device: the reference that the CPU kernels are tested against
    (tests/test_cpu_fast_paths.py, which also shards)."""
    x = torch.randn(3, 5, 128)
    w = torch.randn(72, 128)
    int8, int4 = quantize_int8(w), quantize_int4(w, 32)
    torch.testing.assert_close(torch.ops.quantize.int8_linear(x, *int8), F.linear(x, dequantize_int8(*int8)))
    torch.testing.assert_close(torch.ops.quantize.int4_linear(x, *int4), F.linear(x, dequantize_int4(*int4)), rtol=0,
                               atol=0)
    assert torch.ops.quantize.int8_linear(x.bfloat16(), *int8).dtype == torch.bfloat16
    assert torch.ops.quantize.int4_linear(x.bfloat16(), *int4).dtype == torch.bfloat16


def test_custom_ops_trace_without_graph_breaks():
    x, w = torch.randn(2, 64), torch.randn(40, 64)
    torch.library.opcheck(torch.ops.quantize.int8_linear.default, (x, *quantize_int8(w)))
    torch.library.opcheck(torch.ops.quantize.int4_linear.default, (x, *quantize_int4(w, 32)))
    layer = Int4Linear(*quantize_int4(w, 32))
    torch.testing.assert_close(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x))


@needs_nvcc
def test_cuda_source_compiles_for_sm80_and_sm90a_without_spills():
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # load_inline's: no implicit half/bf16 conversions
    defines = "".join(f"#define {f[2:]}\n" for f in COMMON_NVCC_FLAGS if f.startswith("-D"))
    log = compile_cuda(defines + quantize.CUDA_SOURCE + quantize.MMA_SOURCE)  # the one source kernels() builds
    report = kernel_report(log)
    # gemv: int8/int4 x bf16/fp16 x M 1..8; mma: int8/int4 x bf16/fp16 x 1, 2, 4, 8 tiles of 8 tokens
    for kernel, count in [("gemv_kernel", 32), ("int4_dequantize_kernel", 2), ("mma_kernel", 16)]:
        for arch in ["sm_80", "sm_90a"]:
            found = {k: v for k, v in report.items() if kernel in k[0] and k[1] == arch}
            assert len(found) == count, (kernel, arch)
            for (name, _), v in found.items():
                assert v["spill_stores"] == v["spill_loads"] == 0, f"{name} spills on {arch}: {v}"
    # Register arrays indexed only by unrolled loops: nothing in local memory either.
    assert set(re.findall(r"(\d+) bytes stack frame", log)) == {"0"}


def layer_error(x, w, w_hat):
    return ((x @ (w - w_hat).T) ** 2).sum().item()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_of_a_layer(act_order):
    """On inputs with correlated features GPTQ's output error is well below round-to-nearest's, same format."""
    K, N = 256, 64
    mix = torch.randn(K, K) / K**0.5 + torch.eye(K) * torch.rand(K) * 2
    x = torch.randn(2048, K) @ mix
    w = torch.randn(N, K) * 0.05
    for groupsize in (32, 128):
        codes, scale, zero = gptq(w, x.T @ x, groupsize, act_order=act_order)
        w_gptq = dequantize_int4(quantize.pack_int4(codes), torch.stack([scale, zero], -1))
        w_rtn = dequantize_int4(*quantize_int4(w, groupsize))
        assert layer_error(x, w, w_gptq) < 0.7 * layer_error(x, w, w_rtn)


def quantize_file(checkpoint, mode, groupsize=128, *flags) -> Path:
    """quantize.py's command line, in this process: the path it wrote."""
    return quantize.main(["--checkpoint_path", str(checkpoint), "--mode", mode, "--groupsize", str(groupsize),
                          "--device", "cpu", *map(str, flags)])


@pytest.fixture
def checkpoint(tmp_path, sp_model_file):
    torch.manual_seed(1)
    folder = tmp_path / "m"
    folder.mkdir()
    state = {k: v.bfloat16() for k, v in Transformer(CONFIG).state_dict().items()}
    torch.save(state, folder / "model.pth")
    CONFIG.save(folder / "config.json")
    shutil.copy(sp_model_file, folder / "tokenizer.model")
    (folder / "calibration.txt").write_text("\n".join(stdlib_texts("heldout")[:3]))  # any text; small is fast
    return folder / "model.pth"


@pytest.mark.parametrize("mode", quantize.MODES)
def test_files_load_as_their_pytorch_path_and_repeat_byte_for_byte(checkpoint, mode, monkeypatch):
    monkeypatch.setattr(quantize, "CPU_KERNELS", False)  # the reference; test_cpu_fast_paths.py compares the kernels
    flags = ["--calibration_file", checkpoint.parent / "calibration.txt", "--calibration_samples", 8,
             "--calibration_seq_len", 64]
    path = quantize_file(checkpoint, mode, 32, *flags)
    assert path.name == {"int8": "model_int8.pth", "int4": "model_int4.g32.pth", "int4-gptq": "model_int4-gptq.g32.pth"}[mode]
    first = path.read_bytes()
    assert quantize_file(checkpoint, mode, 32, *flags).read_bytes() == first
    assert not list(checkpoint.parent.glob(".*.partial"))

    state = torch.load(path, weights_only=True, mmap=True)
    assert state["quantization"]["mode"] == mode and state["tok_embeddings.weight"].dtype == torch.bfloat16
    model = load_model(path, "cpu", torch.float32)
    assert isinstance(model.layers[1].feed_forward.w2, Int8Linear if mode == "int8" else Int4Linear)
    # The same model by hand: bf16 weights, each quantized layer replaced by its dequantized weight.
    reference = Transformer(CONFIG)
    dense = {k: v.float() for k, v in state.items() if k != "quantization" and not k.endswith(("scales", "scales_and_zeros"))}
    for name in linear_names(reference):
        q = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
        dense[name + ".weight"] = dequantize_int8(**q) if mode == "int8" else dequantize_int4(**q)
    reference.load_state_dict(dense)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 20))
    torch.testing.assert_close(model(idx), reference(idx))


def test_quantized_model_generates_like_its_dequantized_weights(checkpoint):
    """The decode path too (KV cache, batch 1 and ragged 2): the same tokens as the reference model."""
    model = load_model(quantize_file(checkpoint, "int4", 32), "cpu", torch.float32)
    reference = load_model(checkpoint, "cpu", torch.float32)
    for name in linear_names(reference):
        layer = model.get_submodule(name)
        reference.get_submodule(name).weight.data = dequantize_int4(layer.weight, layer.scales_and_zeros)
    prompts = [[1, 5, 9], [2, 7, 11, 4, 4, 8]]
    assert generate(model, prompts, 12)[0] == generate(reference, prompts, 12)[0]


def test_tied_output_head_stays_the_embedding(tmp_path):
    """tiny-py-draft ties its output head to the embedding: the file must not carry a second copy, and the head
    must stay the (unquantized) embedding table."""
    for f in ("model.pth", "config.json", "tokenizer.model"):
        shutil.copy(ROOT / "checkpoints/tiny-py-draft" / f, tmp_path / f)
    path = quantize_file(tmp_path / "model.pth", "int4", 32)
    assert "output.weight" not in torch.load(path, weights_only=True, mmap=True)
    model = load_model(path, "cpu", torch.float32)
    assert model.output.weight is model.tok_embeddings.weight and "output" not in linear_names(model)


def run(script, *args):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def test_generate_and_eval_load_quantized_files_with_no_flag(checkpoint):
    path = quantize_file(checkpoint, "int8", 32)
    rc, out, err = run("generate.py", "--checkpoint_path", path, "--max_new_tokens", 8, "--device", "cpu")
    assert rc == 0 and "tok/s" in out, err
    rc, out, err = run("eval.py", "--checkpoint_path", path, "--max_tokens", 300, "--seq_len", 64, "--device", "cpu")
    assert rc == 0 and "perplexity" in out, err


def test_clear_errors(checkpoint):
    rc, _, err = run("quantize.py", "--checkpoint_path", checkpoint, "--mode", "int4", "--groupsize", "64")
    assert rc != 0 and err.startswith("error:") and "group size 64" in err and "use 32" in err
    assert not list(checkpoint.parent.glob("model_int4*"))
    path = quantize_file(checkpoint, "int8", 32)
    rc, _, err = run("quantize.py", "--checkpoint_path", path, "--mode", "int4", "--groupsize", "32")
    assert rc != 0 and err.startswith("error:") and "already quantized (int8)" in err
    with pytest.raises(FileNotFoundError, match="not found"):
        quantize_file(checkpoint.parent / "nope.pth", "int8")


def test_bench_times_every_mode_against_the_unquantized_model(checkpoint, capsys):
    """scripts/bench.py decode --mode, on CPU: the code path the GPU runs, minus the speed."""
    import bench
    bench.main(["decode", "--checkpoint_path", str(checkpoint), "--device", "cpu", "--dtype", "float32", "--mode", "int8", "int4",
                "int4-gptq", "--groupsize", "32", "--max_new_tokens", "4", "--runs", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[-4:]] == ["float32", "int8", "int4", "int4-gptq"]
    assert all(line.endswith("x") for line in lines[-4:])


def test_bench_kernels_report_times_every_kernel_against_both_baselines(monkeypatch):
    """scripts/bench.py kernels with the GPU parts stubbed out: every kernel runs on its weights (through the
    custom ops' PyTorch path) and gets a row with both ratios."""
    import types
    import bench
    runs = []

    def one_call(fn, args_list, repeats=20):
        runs.append((fn(*args_list[0]), sum(t.numel() * t.element_size() for args in args_list for t in args)))
        return 1e-4
    monkeypatch.setattr(bench, "time_per_call", one_call)
    monkeypatch.setattr(bench, "int4pack", lambda w, g: [w.clone(), torch.zeros(w.shape[1] // g, w.shape[0], 2)])
    monkeypatch.setattr(bench, "header", lambda device: "")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(L2_cache_size=2**20))
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm", lambda x, packed, g, sz: x @ packed.T.to(x.dtype))
    candidates = bench.kernel_candidates
    monkeypatch.setattr(bench, "kernel_candidates", lambda g, M: candidates(g, M)[:2])  # quantize.py's (others need CUDA)
    report = bench.kernels_bench(bench.parse_args(["kernels", "--device", "cpu", "--model_name", "TinyLlama-1.1B"]))
    rows = report.splitlines()[3:]
    assert len(rows) == 4 * 4 and all(row.endswith("x") for row in rows)  # 4 layers x (2 baselines + 2 kernels)
    assert all(y.shape[0] == 1 and nbytes > 2**20 for y, nbytes in runs)  # one token; copies exceed the (stubbed) L2


FAKE_GPT_FAST = {  # the little of gpt-fast's model.py, quantize.py and generate.py that gpt_fast_worker.py calls
    "model.py": """
import torch
class ModelArgs:
    def __init__(self, **fields):
        self.__dict__.update(fields)
class Transformer(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
    def load_state_dict(self, state, assign=False):
        assert "layers.0.attention.wqkv.weight" in state and "output.weight" in state
""",
    "quantize.py": """
class WeightOnlyInt8QuantHandler:
    def __init__(self, mod):
        self.mod = mod
    def create_quantized_state_dict(self):
        return {"layers.0.attention.wqkv.weight": 0, "output.weight": 0}
    def convert_for_runtime(self):
        return self.mod
class WeightOnlyInt4QuantHandler:
    def __init__(self, mod, groupsize):
        pass
    def create_quantized_state_dict(self):
        raise NotImplementedError("Could not run 'aten::_convert_weight_to_int4pack' on 'CPU'. More, for a page.")
""",
    "generate.py": """
import time
def generate(model, prompt, max_new_tokens, *, interactive, draft_model, callback, **sampling_kwargs):
    for _ in range(max_new_tokens - 1):
        time.sleep(0.01)
        callback(None)
""",
}


def test_bench_cpu_sets_ours_against_gpt_fast_in_every_format(tmp_path, monkeypatch):
    """scripts/bench.py cpu on the tiny model alone, gpt-fast faked in a folder of its own: each format gets our row,
    and gpt-fast's where it runs (its worker found by the names gpt-fast's modules share with ours); where it cannot,
    the reason is said under the table. Without --gpt_fast, the header says there are no gpt-fast rows."""
    import bench
    for name, source in FAKE_GPT_FAST.items():
        (tmp_path / name).write_text(source)
    monkeypatch.setattr(bench, "read_bandwidth", lambda: 1e10)
    monkeypatch.setattr(bench, "cpu_models", lambda args: {"tiny": load_model(TINY, "cpu", torch.float32)})
    flags = ["cpu", "--formats", "int8", "int4", "--runs", "2", "--max_new_tokens", "6", "--no_transformers"]
    report = bench.cpu_bench(bench.parse_args(flags + ["--gpt_fast", str(tmp_path)]))
    rows = [row.split(" | ") for row in report.splitlines() if row.startswith("| tiny |")]
    assert [(system, fmt) for _, system, fmt, *_ in rows] == [("ours", "int8"), ("gpt-fast", "int8"), ("ours", "int4")]
    assert 50 < float(rows[1][4]) < 100  # 10 ms a step
    assert "gpt-fast could not run tiny int4 eager: NotImplementedError: Could not run" in report
    assert "no gpt-fast rows" in bench.cpu_bench(bench.parse_args(flags[:2] + ["int8"] + flags[4:]))

# ---------------------------------------------------------------------------------------------------------------
# The shipped tiny model: held-out perplexity of every format (the figures README gives, on a slice).

def test_tiny_model_perplexity(tmp_path):
    tokenizer = load_tokenizer(TINY.parent)
    heldout = stdlib_texts("heldout")[:6]  # 38k tokens, of which the first 20k are scored
    (tmp_path / "train.txt").write_text("\n".join(stdlib_texts("train")[:100]))  # calibrate on a slice of the train split
    windows = calibration_windows(tokenizer, 32, 512, tmp_path / "train.txt")

    def ppl(mode=None, groupsize=128):
        model = load_model(TINY, "cpu", torch.float32)
        if mode:
            quantize_model(model, mode, groupsize, windows)
        return perplexity(model, tokenizer, heldout, 512, max_tokens=20_000)["perplexity"]

    bf16 = ppl()
    assert ppl("int8") < 1.01 * bf16
    for groupsize in GROUPSIZES:
        rtn, gptq_ = ppl("int4", groupsize), ppl("int4-gptq", groupsize)
        assert gptq_ < rtn < 1.05 * bf16, (groupsize, bf16, gptq_, rtn)


# ---------------------------------------------------------------------------------------------------------------
# On the GPU: the layers in a CUDA graph and compiled (the kernels against the PyTorch path: test_quantize_kernels.py).

@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cuda_graph_replays_to_the_same_output(mode):
    w = torch.randn(4096, 4096, device="cuda") * 0.02
    layer = Int8Linear(*quantize_int8(w)) if mode == "int8" else Int4Linear(*quantize_int4(w, 128))
    x = torch.randn(2, 1, 4096, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x)  # builds the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(y, layer(x), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_decode_of_a_quantized_model_matches_eager(mode):
    """torch.compile traces through the custom ops (no graph break) and the CUDA graph replays them."""
    torch.manual_seed(0)
    config = ModelArgs(block_size=64, vocab_size=512, n_layer=2, n_head=8, n_kv_heads=2, dim=256, intermediate_size=768)
    model = quantize_model(Transformer(config).to("cuda", torch.bfloat16).eval(), mode, 64)
    model.setup_caches(2, 32)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 8), device="cuda"), torch.arange(8, device="cuda"))
        for pos in range(8, 14):
            token, input_pos = torch.randint(0, 512, (2, 1), device="cuda"), torch.tensor([pos], device="cuda")
            eager = model(token, input_pos).float()
            compiled = step(token, input_pos).float()  # rewrites the same cache slots with the same values
            torch.testing.assert_close(compiled, eager, rtol=0.02, atol=0.05 * eager.std().item())
