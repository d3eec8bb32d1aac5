"""quantize.py's tensor-core kernel (MMA_SOURCE) against the PyTorch reference, on the CPU emulator (tests/cuda_emu,
every launch under its three schedules) and on the GPU when there is one; and, through it, greedy speculative and Medusa
decoding of an int4 copy of the tiny model. Inputs are fresh random values and outputs start as NaN."""
from pathlib import Path

import pytest
import torch

import cuda_emu
import quantize
from quantize import GROUPSIZES
from test_quantize_kernels import check_close, dense, nan, random_weight, sampled_rows

backend = cuda_emu.backend_fixture(quantize)

TOKENS = (2, 3, 8, 9, 16, 17, 33, 64)  # each side of every 8-token tile the instances have
DTYPES = (torch.bfloat16, torch.float16)
FORMATS = [("int8", None)] + [("int4", g) for g in GROUPSIZES]
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "checkpoints/tiny-py/model.pth"


def shapes(groupsize):
    """N off the 256 rows a block takes (one block; two, the second part empty); K with a partial last stage (128
    int4 inputs, 64 int8) where the group size allows one."""
    return [(37, {None: 1296, 32: 1344, 64: 1344}.get(groupsize, 1280)), (300, 512)]


def check_mma(backend, mode, groupsize, shape, tokens, dtype, splits=None, locks=None):
    """mma_into against x @ W^T in fp32, at the output dtype's tolerance (the GEMV's). int8 multiplies by the stored
    codes and scales the sum: W is exact. int4 feeds the tensor cores weights rounded once to the activations' dtype,
    as the matmul path does: W is those (against the exact weights the rounding adds ~0.1% of the rms a product)."""
    N, K = shape
    q = random_weight(mode, N, K, groupsize, backend.device)
    rows = sampled_rows(backend, N)
    w = dense(q, rows)
    x = torch.randn(tokens, K, device=backend.device, dtype=dtype)

    def mma():
        out = nan(tokens, N, dtype=dtype, device=backend.device)
        quantize.mma_into(x, *q, out, locks, splits)
        return out
    out = backend.results(mma)
    assert not out.isnan().any(), f"{int(out.isnan().sum())} outputs never written ({N}x{K}, {tokens} tokens)"
    check_close(out[:, rows], x.float() @ (w if mode == "int8" else w.to(dtype).float()).T)


@pytest.mark.parametrize("mode,groupsize", FORMATS, ids=["int8", *(f"int4-g{g}" for g in GROUPSIZES)])
def test_mma_equals_the_reference(backend, mode, groupsize):
    """Every format, both dtypes, K whole (splits=1) and split over 3 blocks a column; int8 and int4 g128 at every
    token count of TOKENS, the other group sizes (which change only the scales' indexing) at 2, 17 and 64."""
    tokens = TOKENS if groupsize in (None, 128) else (2, 17, 64)
    for i, m in enumerate(tokens):
        for j, dtype in enumerate(DTYPES):
            check_mma(backend, mode, groupsize, shapes(groupsize)[(i + j) % 2], m, dtype, splits=1 + 2 * ((i + j) % 2))


def test_mma_on_a_layer_shape(backend):
    """Llama-2-7B's wo (4096 x 4096) at 16 tokens in bf16, K split as mma_splits chooses (8 blocks a column, 128
    blocks): every column, the last-block reduction at scale. Emulated under one schedule, rows sampled."""
    check_mma(backend if backend.name == "cuda" else backend.one_schedule(2), "int4", 128, (4096, 4096), 16,
              torch.bfloat16)


def test_a_tokens_result_does_not_depend_on_the_token_count(backend):
    """The same splits and the same order of sums at 1..64 tokens: each token's outputs are bit for bit the same
    whatever else is in the batch, which is what makes a verification forward agree with plain decoding."""
    device = backend.device
    for mode, groupsize in [("int8", None), ("int4", 64)]:
        q = random_weight(mode, 300, 1024, groupsize, device)
        x = torch.randn(64, 1024, device=device, dtype=torch.bfloat16)
        outs = {}
        for m in (64, 1, 5, 17):
            outs[m] = nan(m, 300, dtype=torch.bfloat16, device=device)
            with cuda_emu.schedule("random:3") if backend.name == "emulator" else torch.no_grad():
                quantize.mma_into(x[:m], *q, outs[m], splits=2)
            assert cuda_emu.bits(outs[m]).equal(cuda_emu.bits(outs[64][:m])), (mode, m)


def test_modules_keep_zeroed_locks_on_the_kernels_device_only(backend):
    """prepare() gives a quantized Linear on the kernels' device its counters (4 bytes a 256 rows, never saved); a
    split call leaves them zero; elsewhere there are none."""
    device = backend.device
    layer = quantize.Int4Linear(*random_weight("int4", 300, 1024, 128, device))
    assert layer.locks.dtype == torch.int32 and layer.locks.tolist() == [0, 0]
    assert "locks" not in layer.state_dict()
    x = torch.randn(2, 9, 1024, device=device, dtype=torch.bfloat16)
    assert quantize.mma_splits(300, 1024, 18, True) > 1
    check_close(layer(x), x.float() @ dense((layer.weight, layer.scales_and_zeros)).T, gemv=False)
    assert layer.locks.tolist() == [0, 0]
    assert quantize.Int8Linear(*random_weight("int8", 8, 64, None, "meta")).locks is None


# ---------------------------------------------------------------------------------------------------------------
# Decoding through the kernels: an int4 copy of the tiny model, in bf16.

def test_greedy_medusa_and_speculative_equal_plain_on_the_kernels(backend):
    """Plain greedy decoding, Medusa (the shipped heads and tree) and speculative decoding (tiny-py-draft proposing 5)
    give the same tokens, every linear layer on the tensor-core kernel: it sums a token's row alike at any count, so
    a verification forward sees what decoding a token at a time does. (With the GEMV decoding 1..4 tokens, as
    linear_kernel has it, the weights differ by their bf16 rounding, and this prompt's 8th token is a near tie that
    flips: greedy equality then holds only as it did with the old matmul path for more than 8 tokens.)"""
    import copy

    import medusa
    import speculative
    from generate import generate, load_model
    from tokenizer import load_tokenizer
    model = quantize.quantize_model(load_model(TINY, backend.device, torch.bfloat16), "int4", 32)
    prompts = [load_tokenizer(TINY.parent).encode("def fibonacci(n):\n    ", bos=False)]
    calls = []
    real = quantize.mma_into
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "INT4_GEMV_TOKENS", 0)
        patch.setattr(quantize, "mma_into", lambda x, *args, **kwargs: (calls.append(x.shape[0]),
                                                                         real(x, *args, **kwargs)))
        plain, _ = generate(copy.deepcopy(model), prompts, 8, temperature=0.0)
        heads, tree = medusa.load(TINY.parent / "medusa_heads.safetensors", model)
        decoder = medusa.decoder(model, heads.to(backend.device, torch.bfloat16), tree, 0.0, None, None, compile=False)
        tree_tokens, _ = generate(model, prompts, 8, decoder=decoder)
        draft = load_model(TINY.parent.parent / "tiny-py-draft/model.pth", backend.device, torch.bfloat16)
        decoder = speculative.decoder(model, draft, 5, 0.0, None, None, compile=False)
        drafted, _ = generate(model, prompts, 8, decoder=decoder)
    assert tree_tokens == plain and drafted == plain
    assert {1, 6} <= set(calls) and max(calls) > 6  # a token at a time, k + 1 = 6 verified, a Medusa tree


# ---------------------------------------------------------------------------------------------------------------
# The mutation test: the pipeline's own mistakes, each put into MMA_SOURCE, fail the checks (a wrong or unwritten
# output, or the schedules disagreeing: a copy lands at issue under "forward" and at its wait under "reverse").

MMA_MUTATIONS = {
    "a stage read before it lands": ("cp_async_wait<STAGES - 2>();", "cp_async_wait<STAGES - 1>();"),
    "no barrier between the copies and the reads": ("__syncthreads();              // ...and everyone's;", "//"),
    "the counters not reset": ("if (threadIdx.x == 0) locks[blockIdx.x] = 0;", ""),
}


@pytest.fixture(scope="module")
def mma_mutants():
    """The sources with MMA_SOURCE mutated, built at -O0 with only `mma` bound (all mma_into needs), two at a
    time."""
    from concurrent.futures import ThreadPoolExecutor

    def build(change):
        old, new = change
        assert quantize.MMA_SOURCE.count(old) == 1, old
        return cuda_emu.load_inline("quantize_mma_mutant", [quantize.MMA_DECLARATIONS],
                                    [quantize.CUDA_SOURCE, quantize.MMA_SOURCE.replace(old, new)], ["mma"], flags=["-O0"])
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(MMA_MUTATIONS, pool.map(build, MMA_MUTATIONS.values())))


@pytest.mark.parametrize("mutation", MMA_MUTATIONS)
def test_each_pipeline_mistake_fails_the_checks(mma_mutants, mutation):
    with cuda_emu.emulated(quantize, mma_mutants[mutation]) as emulator:
        locks = quantize.mma_locks(300, "cpu")  # kept, as a module keeps them: each call must leave them zero
        with pytest.raises((AssertionError, cuda_emu.EmulatorError)):
            check_mma(emulator, "int4", 64, (300, 1344), 9, torch.bfloat16, splits=3, locks=locks)
