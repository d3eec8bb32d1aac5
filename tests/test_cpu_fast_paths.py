"""The CPU paths of the quantized formats (issue: fast on a laptop CPU too) against the PyTorch reference they replace:
logits within the format's tolerance on fresh random inputs, and the same greedy tokens on the shipped tiny model."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import anyprec
import quantize
from eval import calibration_windows, stdlib_texts
from generate import generate, load_model, plain_decoder
from model import linear_names
from quantize import (GROUPSIZES, Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, quantize_int4,
                      quantize_int8)
from tokenizer import load_tokenizer

TINY = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-py" / "model.pth"


def check_close(out, ref):
    """Within the rounding of bf16 activations and output (2^-9 each, relative): the kernels' error on a bf16 CPU,
    far below int8's or int4's own."""
    assert out.dtype == ref.dtype
    tolerance = 2**-7 * ref.float().abs().max().item() + 1e-6
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tolerance)


def reference(layer, x):
    """What the module computes, dequantised to fp32 and multiplied in fp32."""
    if isinstance(layer, Int8Linear):
        w = dequantize_int8(layer.weight, layer.scales)
    else:
        w = dequantize_int4(layer.weight, layer.scales_and_zeros)
    return F.linear(x.float(), w).to(x.dtype)


@pytest.mark.parametrize("N, K", [(64, 256), (35, 512), (1, 256), (200, 768)])
def test_int8_and_int4_equal_the_reference(N, K):
    w = torch.randn(N, K) * 0.02
    layers = [Int8Linear(*quantize_int8(w))] + [Int4Linear(*quantize_int4(w, g)) for g in GROUPSIZES if K % g == 0]
    for layer in layers:
        for shape in [(1, 1), (1, 7), (3, 17)]:
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(*shape, K, dtype=dtype)
                check_close(layer(x), reference(layer, x))


def test_int4_shards_and_device_moves_rebuild_the_cpu_copy():
    """tp.py's shards: a row-parallel one (a non-contiguous column slice) and a column-parallel one of 24 rows, which
    the kernel's 16-row tiles pad."""
    w = torch.randn(48, 512) * 0.02
    for dim, ranges, K in [(1, [(256, 256)], 256), (0, [(0, 16), (32, 8)], 512)]:
        part = Int4Linear(*quantize_int4(w, 64))
        part.shard(dim, ranges)
        assert part.cpu_weight.shape[0] == 32 if dim == 0 else 48
        x = torch.randn(2, K)
        check_close(part(x), reference(part, x))
    assert Int4Linear(*quantize_int4(w, 64)).to("meta").cpu_weight is None


def test_compiled_cpu_paths_equal_eager():
    torch._dynamo.reset()
    w = torch.randn(96, 256) * 0.02
    x = torch.randn(1, 256)
    for layer in (Int8Linear(*quantize_int8(w)), Int4Linear(*quantize_int4(w, 32))):
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x), rtol=2**-8, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# The shipped tiny model: greedy tokens of the CPU paths equal the reference's.

@pytest.fixture(scope="module")
def prompt():
    tokenizer = load_tokenizer(TINY.parent)
    return [tokenizer.encode(text, bos=True)[:24] for text in stdlib_texts("heldout")[:2]]


def greedy(model, prompt, monkeypatch, module, kernels: bool, compile=False) -> list:
    monkeypatch.setattr(module, "CPU_KERNELS", kernels)
    decoder = plain_decoder(model, compile=compile)
    return generate(model, prompt, 40, decoder=decoder)[0]


@pytest.mark.parametrize("mode", quantize.MODES)
def test_tiny_model_greedy_tokens_equal_the_reference(mode, prompt, monkeypatch):
    model = load_model(TINY, "cpu", torch.float32)
    windows = calibration_windows(load_tokenizer(TINY.parent), 8, 128) if mode == "int4-gptq" else None
    model = quantize.quantize_model(model, mode, 64, windows)
    assert greedy(model, prompt, monkeypatch, quantize, True) == greedy(model, prompt, monkeypatch, quantize, False)


def test_tiny_model_any_precision_tokens_equal_the_reference_at_every_width(prompt, monkeypatch, tmp_path):
    model = load_model(TINY, "cpu", torch.float32)
    fisher = {name: torch.ones_like(model.get_submodule(name).weight)
              for name in linear_names(model, include_output=False)}
    state, _ = anyprec.quantize_state(model.state_dict(), fisher, 3, 5, progress=False, iters=0)
    anyprec.swap_linears(model, state.pop("quantization"))
    model.load_state_dict(state, strict=False)
    for p in (3, 4, 5):
        anyprec.set_precision(model, p)
        assert greedy(model, prompt, monkeypatch, anyprec, True) == greedy(model, prompt, monkeypatch, anyprec, False)
