"""quantize.py's CUDA kernels against its PyTorch reference (dequantize_int8 / dequantize_int4, then an fp32 matmul)
on two backends: the CPU emulator (tests/cuda_emu) always, every launch under its three schedules, and the GPU when
there is one. Inputs are fresh random values and outputs start as NaN: an element a kernel never writes fails."""
import pytest
import torch

import cuda_emu
import quantize
from quantize import GROUPSIZES, dequantize_int4, dequantize_int8

backend = cuda_emu.backend_fixture(quantize)

# N off the 16 rows a block takes; K with a partial round of unrolled loads (and every group size dividing it).
ODD = [(1, 256), (7, 768), (37, 2304), (129, 1280)]
LAYERS = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # Llama-2-7B's and Llama-3-8B's
BATCHES = (1, 2, 3, 8)
DTYPES = (torch.bfloat16, torch.float16)
FORMATS = [("int8", None)] + [("int4", g) for g in GROUPSIZES]


def random_weight(mode, N, K, groupsize, device):
    """(weight, params) in the file's storage: random codes, scales and zeros (the quantizer has its own tests)."""
    if mode == "int8":
        return (torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device),
                (torch.rand(N, device=device) * 4e-4 + 1e-5).bfloat16())
    scale = torch.rand(N, K // groupsize, device=device) * 4e-3 + 1e-4
    zero = torch.randn(N, K // groupsize, device=device) * 0.01
    return (torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device),
            torch.stack([scale, zero], dim=-1).bfloat16())


def dense(q, rows=slice(None)):
    """The fp32 weight q stands for (the rows of it), by the file's reference."""
    weight, params = q[0][rows], q[1][rows]
    return dequantize_int8(weight, params) if weight.dtype == torch.int8 else dequantize_int4(weight, params)


def sampled_rows(backend, N):
    """Rows whose values a test compares: all on the GPU; emulated layer shapes every 37th and the last block's (the
    reference dequantizes in seconds per 10M weights). Every element is still checked for NaN."""
    return torch.arange(N) if backend.name == "cuda" or N < 2048 else torch.cat([torch.arange(0, N, 37),
                                                                                  torch.arange(N - 16, N)])


def nan(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def check_close(out, ref, gemv=True):
    """GEMV: fp32 sums rounded once to the output dtype. Matmul path: the weight is rounded to bf16 or fp16 first (a
    random error of ~0.001 x the output's rms per element, hence the atol). NaN fails."""
    rms = ref.pow(2).mean().sqrt().item()
    rtol = (2**-8 if out.dtype == torch.bfloat16 else 2**-10) if gemv else 2**-7
    error = (out.float() - ref).abs()
    bad = ~(error <= (2**-10 if gemv else 2**-7) * rms + rtol * ref.abs())
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} elements off, the first {tuple(i)}: "
                             f"{out[i].item()} for {ref[i].item()}")


def check_gemv(backend, mode, groupsize, shapes, batches=BATCHES, dtypes=DTYPES):
    """gemv_into against x @ W^T in fp32 for every shape, batch and dtype (the mutation test runs this too)."""
    for N, K in shapes:
        q = random_weight(mode, N, K, groupsize, backend.device)
        rows = sampled_rows(backend, N)
        w = dense(q, rows)
        for M in batches:
            for dtype in dtypes:
                x = torch.randn(M, K, device=backend.device, dtype=dtype)

                def gemv():
                    out = nan(M, N, dtype=dtype, device=backend.device)
                    quantize.gemv_into(x, *q, out)
                    return out
                out = backend.results(gemv)
                assert not out.isnan().any(), f"{int(out.isnan().sum())} outputs never written ({N}x{K}, {M} tokens)"
                check_close(out[:, rows], x.float() @ w.T)


def check_dequantize(backend, groupsize, shapes, dtypes=DTYPES):
    """dequantize_int4_into equals dequantize_int4 bit for bit: (code - 8) * scale + zero is one fma, rounded once."""
    for N, K in shapes:
        q = random_weight("int4", N, K, groupsize, backend.device)
        rows = sampled_rows(backend, N)
        w = dense(q, rows)
        for dtype in dtypes:
            def dequantize():
                out = nan(N, K, dtype=dtype, device=backend.device)
                quantize.dequantize_int4_into(*q, out)
                return out
            out = backend.results(dequantize)
            assert not out.isnan().any(), f"{int(out.isnan().sum())} weights never written ({N}x{K})"
            assert torch.equal(out[rows], w.to(dtype)), (N, K, dtype)


@pytest.mark.parametrize("mode,groupsize", FORMATS, ids=["int8", *(f"int4-g{g}" for g in GROUPSIZES)])
def test_gemv_equals_the_reference(backend, mode, groupsize):
    """Every format and dtype (each a kernel of its own); int8 and int4 g128 at every token count 1..8 (each a kernel
    of its own too), the other group sizes, which only shift an index, at 1, 2, 3 and 8."""
    check_gemv(backend, mode, groupsize, ODD, range(1, 9) if groupsize in (None, 128) else BATCHES)


@pytest.mark.parametrize("shape", LAYERS, ids=[f"{N}x{K}" for N, K in LAYERS])
def test_gemv_on_layer_shapes(backend, shape):
    """On the GPU every batch and dtype of both formats; emulated (~8 ns of CPU per weight), one token in bf16 of one
    format a shape, under one schedule."""
    i = LAYERS.index(shape)
    if backend.name == "cuda":
        for mode, groupsize in [("int8", None), ("int4", 128)]:
            check_gemv(backend, mode, groupsize, [shape])
    else:
        mode, groupsize = FORMATS[i % 2 * 3]  # int8, int4 g128, int8, int4 g128
        check_gemv(backend.one_schedule(i), mode, groupsize, [shape], [1], [torch.bfloat16])


def test_gemv_takes_groups_past_a_round_of_loads(backend):
    """The kernels take any power-of-two group from 32 inputs (_check). A warp's round of loads is two steps 1024
    inputs apart, 2048 a round: from groups of 2048 both steps can fall in one group, which the kernel's advance of
    its scale pointers must get right (the file's own group sizes, 32 to 256, never do)."""
    for groupsize, shape in [(1024, (21, 3072)), (2048, (19, 6144)), (4096, (17, 8192))]:
        check_gemv(backend.one_schedule(1), "int4", groupsize, [shape], [1, 2, 3], [torch.bfloat16])

@pytest.mark.parametrize("groupsize", GROUPSIZES)
def test_int4_dequantize_is_bit_exact(backend, groupsize):
    check_dequantize(backend, groupsize, ODD)
    if groupsize == 128 and backend.name == "cuda":
        check_dequantize(backend, groupsize, LAYERS)
    elif groupsize == 128:
        check_dequantize(backend.one_schedule(0), groupsize, LAYERS[:1], [torch.bfloat16])


def exact_weights(mode, tokens):
    """Whether the op at this many tokens multiplies by the stored weights (the GEMV; int8's tensor-core kernel, which
    scales the finished sum) rather than by weights rounded to the activations' dtype (int4's tensor-core kernel, the
    matmul path)."""
    kernel = quantize.linear_kernel(tokens, mode == "int4")
    return kernel == "gemv" or (kernel == "mma" and mode == "int8")


def test_ops_take_the_kernels_by_token_count(backend):
    """The custom ops as the model calls them: [batch, tokens, K], each token count by the kernel linear_kernel names
    (GEMV, tensor cores up to 64 tokens, then int4's dequantize kernel or int8's matmul); activations that are a
    strided or misaligned view are copied for the kernels; an int8 width off 16 takes the matmul."""
    device = backend.device
    for mode, groupsize in [("int8", None), ("int4", 64)]:
        op = torch.ops.quantize.int8_linear if mode == "int8" else torch.ops.quantize.int4_linear
        q = random_weight(mode, 100, 512, groupsize, device)
        for batch, tokens in [(1, 1), (2, 3), (3, 3), (2, 12), (4, 16), (3, 22)]:
            x = torch.randn(batch, tokens, 512, device=device, dtype=torch.bfloat16)
            check_close(op(x, *q), x.float() @ dense(q).T, gemv=exact_weights(mode, batch * tokens))
        for x in [torch.randn(3 * 512 + 1, device=device, dtype=torch.bfloat16)[1:].view(3, 512),
                  torch.randn(512, 3, device=device, dtype=torch.float16).t()]:
            check_close(op(x, *q), x.float() @ dense(q).T)
    q = random_weight("int8", 50, 40, None, device)
    x = torch.randn(1, 40, device=device, dtype=torch.bfloat16)
    check_close(torch.ops.quantize.int8_linear(x, *q), x.float() @ dense(q).T, gemv=False)


@pytest.mark.cuda
@pytest.mark.parametrize("mode,groupsize", [("int8", None), ("int4", 128)])
def test_ops_on_every_llama_layer_shape(mode, groupsize):
    """On the GPU, the ops at every Llama-2-7B and Llama-3-8B shape (heads included) and prefill lengths."""
    for N, K in [(12288, 4096), (32000, 4096), (6144, 4096), (4096, 14336), (128256, 4096), *LAYERS]:
        q = random_weight(mode, N, K, groupsize, "cuda")
        w = dense(q)
        op = torch.ops.quantize.int8_linear if mode == "int8" else torch.ops.quantize.int4_linear
        for tokens in (1, 8, 17, 64, 300):
            x = torch.randn(1, tokens, K, device="cuda", dtype=torch.bfloat16)
            check_close(op(x, *q)[0], x[0].float() @ w.T, gemv=exact_weights(mode, tokens))


def test_int8_matmul_path_survives_massive_fp16_activations(backend, monkeypatch):
    """Llama's layer-1 w2 reads activations in the thousands. Multiplying them by the unscaled int8 weight (up to 127)
    overflowed fp16 in the matmul path: over 64 tokens on the kernels' device, and on any device without them. The
    tensor-core kernel (17 tokens) sums in fp32 before it scales."""
    device = backend.device
    q = random_weight("int8", 64, 4096, None, device)
    q = (q[0], (q[1].float() * 10).bfloat16())  # |w| up to 0.05
    for tokens in (65, 17, 3):
        if tokens == 3:
            monkeypatch.setattr(quantize, "KERNEL_DEVICE", "none")  # the PyTorch path
        x = torch.randn(tokens, 4096, device=device, dtype=torch.float16)
        x[:, :4] = 2000 * torch.sign(dense(q)[:, :4].sum(0))  # massive channels, adding up rather than cancelling
        out = torch.ops.quantize.int8_linear(x, *q)
        assert out.isfinite().all()
        check_close(out, x.float() @ dense(q).T, gemv=False)


def test_a_weight_the_kernels_cannot_read_raises(backend):
    """A non-contiguous or misaligned weight (a row-parallel shard cut on the GPU) used to fall back silently to
    dequantizing the whole weight on every call; now the op says what to fix."""
    device = backend.device
    for mode, groupsize in [("int8", None), ("int4", 32)]:
        weight, params = random_weight(mode, 64, 256, groupsize, device)
        op = torch.ops.quantize.int8_linear if mode == "int8" else torch.ops.quantize.int4_linear
        shard = (weight[:, 64:], params) if mode == "int8" else (weight[:, 32:], params[:, 2:])
        misaligned = torch.empty(weight.numel() + 8, dtype=weight.dtype, device=device)[8:].view_as(weight)
        misaligned.copy_(weight)
        for w, p in [shard, (misaligned, params)]:
            x = torch.randn(1, 2 * w.shape[1] if mode == "int4" else w.shape[1], device=device, dtype=torch.bfloat16)
            with pytest.raises(ValueError, match="contiguous, 16-byte aligned"):
                op(x, w, p)
