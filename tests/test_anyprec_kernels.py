"""anyprec.py's CUDA kernels (bitplane GEMV and dequantize, every width 3..8) against its PyTorch reference
(anyprec.dequantize, then an fp32 matmul) on two backends: the CPU emulator (tests/cuda_emu) always, every launch under
its three schedules, and the GPU when there is one. Inputs are fresh random values and outputs start as NaN."""
import pytest
import torch
import torch.nn.functional as F

import anyprec
import cuda_emu
from anyprec import AnyPrecLinear, dequantize, padded

backend = cuda_emu.backend_fixture(anyprec)

# K off the 512-weight chunks by 1, 2 and 3 groups of 128 (96 pads to 128; 200 to 256, no chunk at all; 1056 to 1152;
# 2400 to 2432), a warp taking two chunks (5216: 10 chunks, 8 warps), N off every row count a block takes (16 or 32).
SMALL = [(9, 96), (21, 200), (37, 1056), (45, 2400), (11, 5216)]
LAYERS = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # Llama-2-7B's and Llama-3-8B's
WIDTHS = range(anyprec.MIN_BITS, anyprec.MAX_BITS + 1)
TOKENS = (1, 2, 3, 8)
DTYPES = (torch.bfloat16, torch.float16)


def random_planes(N, K, device):
    """8 planes of random bits (any bits are codes) and a sorted fp16 table per width."""
    qweight = torch.randint(-2**31, 2**31, (8, N, padded(K) // 32), dtype=torch.int32, device=device)
    luts = {p: (torch.randn(N, 2**p, device=device) * 0.02).sort(dim=1).values.half() for p in WIDTHS}
    return qweight, luts


def sampled_rows(backend, N):
    """Rows whose values a test compares: all on the GPU; emulated layer shapes every 37th and the last block's
    (unpacking a layer in PyTorch takes seconds). Every element is still checked for NaN."""
    return torch.arange(N) if backend.name == "cuda" or N < 2048 else torch.cat([torch.arange(0, N, 37),
                                                                                  torch.arange(N - 16, N)])


def nan(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def check_close(out, ref, gemv=True):
    """GEMV: fp32 sums rounded once to the output dtype. Matmul path: the weight rounded to bf16 first. NaN fails."""
    rms = ref.pow(2).mean().sqrt().item()
    rtol = (2**-8 if out.dtype == torch.bfloat16 else 2**-10) if gemv else 2**-7
    bad = ~((out.float() - ref).abs() <= (2**-10 if gemv else 2**-7) * rms + rtol * ref.abs())
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} elements off, the first {i}: {out[i].item()} for "
                             f"{ref[i].item()}")


def check_gemv(backend, shapes, widths=WIDTHS, tokens=TOKENS, dtypes=DTYPES):
    """gemv_into against x @ W_p^T in fp32 (the mutation test runs this too)."""
    for N, K in shapes:
        qweight, luts = random_planes(N, K, backend.device)
        rows = sampled_rows(backend, N)
        for p in widths:
            weight = dequantize(qweight[:, rows], luts[p][rows], p, K).float()
            for M in tokens:
                for dtype in dtypes:
                    x = F.pad(torch.randn(M, K, device=backend.device, dtype=dtype), (0, padded(K) - K))

                    def gemv():
                        out = nan(M, N, dtype=dtype, device=backend.device)
                        anyprec.gemv_into(x, qweight, luts[p], p, out)
                        return out
                    out = backend.results(gemv)
                    assert not out.isnan().any(), f"{int(out.isnan().sum())} outputs never written ({N}x{K}, {p} bits)"
                    check_close(out[:, rows], x[:, :K].float() @ weight.T)


def check_dequant(backend, shapes, widths=WIDTHS, dtypes=DTYPES):
    """dequant_into equals dequantize bit for bit: a table lookup, converted once."""
    for N, K in shapes:
        qweight, luts = random_planes(N, K, backend.device)
        rows = sampled_rows(backend, N)
        for p in widths:
            weight = dequantize(qweight[:, rows], luts[p][rows], p, K)
            for dtype in dtypes:
                def dequant():
                    out = nan(N, padded(K), dtype=dtype, device=backend.device)
                    anyprec.dequant_into(qweight, luts[p], p, out)
                    return out
                out = backend.results(dequant)
                assert not out.isnan().any(), f"{int(out.isnan().sum())} weights never written ({N}x{K}, {p} bits)"
                assert torch.equal(out[rows, :K], weight.to(dtype)), (N, K, p, dtype)


@pytest.mark.parametrize("bits", WIDTHS)
def test_gemv_equals_the_reference(backend, bits):
    """Every width and token bucket; the dtype is a flag of the same kernel, so emulated widths take turns at it."""
    check_gemv(backend, SMALL, [bits], dtypes=[DTYPES[bits % 2]] if backend.name == "emulator" else DTYPES)


@pytest.mark.parametrize("shape", LAYERS, ids=[f"{N}x{K}" for N, K in LAYERS])
def test_gemv_on_layer_shapes(backend, shape):
    """On the GPU every width, token count and dtype; emulated, one token in bf16 at one width a shape, under one
    schedule (~20 ns of CPU per weight)."""
    i = LAYERS.index(shape)
    if backend.name == "cuda":
        check_gemv(backend, [shape])
    else:
        check_gemv(backend.one_schedule(i), [shape], [3 + i], [1], [torch.bfloat16])


@pytest.mark.parametrize("bits", WIDTHS)
def test_dequant_is_bit_exact(backend, bits):
    check_dequant(backend, SMALL, [bits])
    if bits == 8 and backend.name == "cuda":
        check_dequant(backend, LAYERS, [bits], [torch.bfloat16])
    elif bits == 8:
        check_dequant(backend.one_schedule(0), LAYERS[:1], [bits], [torch.bfloat16])


def layer(qweight, luts, K):
    """An AnyPrecLinear holding these planes and tables, loaded as load_model loads one."""
    module = AnyPrecLinear(K, qweight.shape[1], WIDTHS, qweight.device)
    module.load_state_dict({"qweight": qweight, **{f"lut{p}": lut for p, lut in luts.items()}})
    return module


def test_ops_and_forward_take_the_kernels(backend):
    """The custom ops as AnyPrecLinear calls them (x unpadded, or a misaligned view: both copied for the kernels), and
    forward: 1..8 tokens by the GEMV, more by the dequantize kernel and a matmul."""
    N, K, device = 72, 1000, backend.device
    qweight, luts = random_planes(N, K, device)
    module = layer(qweight, luts, K)
    for p in (3, 8):
        anyprec.set_precision(module, p)
        weight = dequantize(qweight, luts[p], p, K).float()
        for x in [torch.randn(3, K, device=device, dtype=torch.float16),
                  torch.randn(3 * K + 1, device=device, dtype=torch.bfloat16)[1:].view(3, K)]:
            check_close(torch.ops.anyprec.gemv(x, qweight, luts[p], p), x.float() @ weight.T)
        assert torch.equal(torch.ops.anyprec.dequant(qweight, luts[p], p, torch.float16)[:, :K], weight.half())
        for batch, tokens in [(1, 1), (2, 4), (3, 3), (2, 12)]:
            for dtype in (torch.bfloat16, torch.float16):
                x = torch.randn(batch, tokens, K, device=device, dtype=dtype)
                check_close(module(x), x.float() @ weight.T, gemv=batch * tokens <= anyprec.GEMV_MAX_TOKENS)


def test_fp32_activations_keep_fp32_without_unpacking_every_call(backend, monkeypatch):
    """fp32 activations on the kernels' device used to unpack every plane in PyTorch on every call (the codes are not
    kept there). The tables are fp16, so the dequantize kernel's fp16 weight is exact and the result is the fp32
    reference's."""
    N, K, device = 72, 1000, backend.device
    qweight, luts = random_planes(N, K, device)
    module = layer(qweight, luts, K)
    module.codes = None  # as on CUDA
    weights = {p: dequantize(qweight, luts[p], p, K).float() for p in (3, 8)}
    monkeypatch.setattr(anyprec, "unpack", lambda *args: pytest.fail("unpacked the planes in PyTorch"))
    for p, weight in weights.items():
        anyprec.set_precision(module, p)
        for tokens in (1, 24):
            x = torch.randn(tokens, K, device=device)
            torch.testing.assert_close(module(x), x @ weight.T)


@pytest.mark.cuda
def test_kernels_replay_inside_a_cuda_graph():
    qweight, luts = random_planes(4096, 4096, "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture
        torch.ops.anyprec.gemv(x, qweight, luts[3], 3)
        torch.ops.anyprec.dequant(qweight, luts[8], 8, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.anyprec.gemv(x, qweight, luts[3], 3)
        w = torch.ops.anyprec.dequant(qweight, luts[8], 8, torch.bfloat16)
    x.copy_(torch.randn_like(x))
    y.zero_(), w.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.ops.anyprec.gemv(x, qweight, luts[3], 3))
    assert torch.equal(w, torch.ops.anyprec.dequant(qweight, luts[8], 8, torch.bfloat16))
