"""Decode speed, against the device's own copy bandwidth or against plain decoding, measured in the same run. Without
--checkpoint_path the weights are random, of any registry shape (nothing to download).

    python scripts/bench.py decode --model_name Llama-2-7b-chat-hf --compile            # batch 1, 200 new tokens
    python scripts/bench.py decode --compile --mode int8 int4 anyprec --precision 3 8   # and quantized, same run
    python scripts/bench.py kernels --batch_size 1       # every GEMV kernel vs torch's, on the 7B layer shapes
    python scripts/bench.py kernels --tokens 1 8 16 64 --model_names Llama-2-7b-chat-hf Meta-Llama-3-8B  # same run
    python scripts/bench.py speculative --compile        # plain vs an int4 copy and 3-bit self drafting
    python scripts/bench.py speculative --checkpoint_path checkpoints/tiny-py/model.pth \
        --draft_checkpoint_path checkpoints/tiny-py-draft/model.pth --speculate_k 4
    python scripts/bench.py medusa --checkpoint_path checkpoints/tiny-py/model.pth      # its shipped heads
    python scripts/bench.py tp --compile                 # decode on 1, 2, 4, 8 GPUs (torchrun), as many as there are
    python scripts/bench.py cpu --compile --gpt_fast /tmp/gpt-fast   # CPU: ours vs gpt-fast's and transformers'

Decode at batch 1 reads every weight once per token, so weight bytes x steps/s is the bandwidth it achieves; the
fraction of the measured copy bandwidth (bytes read + written per second) is how close to the hardware it runs.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import anyprec  # noqa: E402
import cli  # noqa: E402
import medusa  # noqa: E402
import quantize  # noqa: E402
import speculative  # noqa: E402
from eval import stdlib_texts  # noqa: E402
from generate import (acceptance_summary, default_device, generate, load_model, peak_memory_gb,  # noqa: E402
                      plain_decoder, reserve_cache, sync, weight_bytes)
from model import ModelArgs, Transformer  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
from tp import apply_tp, max_over_ranks, maybe_init_dist  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# Models and prompts.

def random_model(config: ModelArgs, device, dtype, tp=False) -> Transformer:
    """Weights drawn on the device itself: a 7B model in seconds, never whole on the host (nor, with tp=True under
    torchrun, on one GPU: each rank draws only its shard)."""
    with torch.device("meta"):
        model = Transformer(config)
    if tp:
        apply_tp(model)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def load_or_random(args, tp=False) -> tuple[Transformer, str]:
    dtype = getattr(torch, args.dtype)
    if args.checkpoint_path is not None:
        return load_model(args.checkpoint_path, args.device, dtype, tp=tp), str(args.checkpoint_path)
    return random_model(ModelArgs.from_name(args.model_name), args.device, dtype, tp=tp), args.model_name


def uncached_copy(model: Transformer) -> Transformer:
    """A copy of the weights without the KV cache (quantizers take whole sequences; decoding makes its own)."""
    copy = deepcopy(model)
    copy.remove_caches()
    return copy


def anyprec_copy(model: Transformer, seed_bits=3, parent_bits=8) -> Transformer:
    """An any-precision copy of `model`, quantized by anyprec.quantize_state (uniform Fisher, the k-means stopped at
    its seeding). Decode speed depends on the shapes, not on the values: the first block is quantized and every
    block loads its codes and tables."""
    copy, block, device = uncached_copy(model), model.layers[0], model.tok_embeddings.weight.device
    fisher = {name: torch.ones(m.weight.shape, device=device) for name, m in block.named_modules()
              if isinstance(m, nn.Linear)}
    state, _ = anyprec.quantize_state(block.state_dict(), fisher, seed_bits, parent_bits, device, progress=False,
                                      iters=0)
    anyprec.swap_linears(copy, state.pop("quantization"))
    for layer in copy.layers:
        layer.load_state_dict(state)
    return copy


def bench_prompts(args, vocab_size, prompt_len=16) -> list:
    """One prompt per row: the opening of a held-out stdlib file when the checkpoint has a tokenizer, else random."""
    if args.checkpoint_path is not None and any(args.checkpoint_path.parent.glob("tokenizer.*")):
        tokenizer = load_tokenizer(args.checkpoint_path.parent)
        return [tokenizer.encode(text, bos=True)[:prompt_len] for text in stdlib_texts("heldout")[:args.batch_size]]
    return torch.randint(0, vocab_size, (args.batch_size, prompt_len)).tolist()


def header(device) -> str:
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    return f"device {name} | torch {torch.__version__} | {datetime.date.today().isoformat()}"


def described(args, what) -> str:
    return (f"{what} ({args.dtype}, batch {args.batch_size}, {'compiled' if args.compile else 'eager'}, temperature "
            f"{args.temperature}, {args.max_new_tokens} new tokens)")


# ---------------------------------------------------------------------------------------------------------------
# Timing.

def copy_bandwidth(device, nbytes=1 << 30, repeats=10) -> float:
    """Bytes read + written per second by a device-to-device copy of nbytes (well beyond any cache)."""
    if torch.device(device).type != "cuda":
        nbytes = min(nbytes, 1 << 28)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - t0)


def time_decoder(model, decoder, prompts, args) -> dict:
    """Medians over --runs generations of exactly --max_new_tokens (no stop id), after a warm-up that compiles:
    tok/s (tokens of decode steps / their time), seconds per step, time to first token; and the tokens per step with
    their histogram, over all the runs."""
    generate(model, prompts, args.max_new_tokens, decoder=decoder)
    stats = [generate(model, prompts, args.max_new_tokens, decoder=decoder)[1] for _ in range(args.runs)]
    tokens_per_step, histogram = acceptance_summary([sum(c) for c in zip(*(s["accepted"] for s in stats))])
    return dict(tok_s=statistics.median(s["decode_tokens"] / s["decode_time"] for s in stats),
                step_s=statistics.median(s["decode_time"] / s["decode_steps"] for s in stats),
                ttft_ms=1000 * statistics.median(s["ttft"] for s in stats), tokens_per_step=tokens_per_step,
                histogram=histogram)


def compare(args, model, prompts, decoder) -> dict:
    """Plain decoding and `decoder` on the same prompts in one run, each timed by time_decoder: tok/s of each, their
    ratio, the decoder's tokens per forward and histogram, its step time over a plain step's. The cache is sized for
    `decoder` first, so that both attend over the same length."""
    reserve_cache(decoder, len(prompts), max(map(len, prompts)), args.max_new_tokens)
    plain = time_decoder(model, plain_decoder(model, args.temperature, compile=args.compile), prompts, args)
    other = time_decoder(model, decoder, prompts, args)
    return dict(other, plain=plain["tok_s"], ratio=other["tok_s"] / plain["tok_s"],
                step_ratio=other["step_s"] / plain["step_s"])


# ---------------------------------------------------------------------------------------------------------------
# decode: the model as loaded and quantized copies, against the copy bandwidth. tp: the same on 1..8 ranks.

def variants(args, model):
    """(name, model): the model as loaded, then a copy quantized in memory for each --mode (int4-gptq calibrates on
    random tokens: enough to time it); one any-precision copy serves every --precision."""
    yield args.dtype, model
    for mode in args.mode:
        if mode == "anyprec":
            copy = anyprec_copy(model)
            for precision in args.precision:
                anyprec.set_precision(copy, precision)  # one more compiled graph (and CUDA graph) each
                yield f"anyprec {precision}-bit", copy
            continue
        windows = torch.randint(0, model.config.vocab_size, (8, min(256, model.config.block_size)))
        copy = quantize.quantize_model(uncached_copy(model), mode, args.groupsize, windows)  # only GPTQ reads them
        yield (mode if mode == "int8" else f"{mode} g{args.groupsize}"), copy


def decode_bench(args) -> str:
    """tok/s of each variant, the weight bytes it reads per second and their fraction of the copy bandwidth, the
    speed-up over the model as loaded; under torchrun (tp), of this rank's shard, and --json gets rank 0's figures."""
    rank = maybe_init_dist(args.device)
    if rank:
        sys.stdout = open(os.devnull, "w")  # output on rank 0 only
    model, what = load_or_random(args, tp=rank is not None)
    prompts, copy = bench_prompts(args, model.config.vocab_size), copy_bandwidth(args.device)
    lines = [header(args.device), f"{described(args, what)}; copy bandwidth {copy / 1e9:.1f} GB/s (read + written)",
             f"{'mode':>14}  {'weights GB':>10}  {'tok/s':>7}  {'weights GB/s':>12}  {'of copy':>7}  {'ttft ms':>7}  "
             f"{'speed-up':>8}"]
    first = None
    for name, variant in variants(args, model):
        torch._dynamo.reset()  # each model compiles its own graphs
        r = time_decoder(variant, plain_decoder(variant, args.temperature, compile=args.compile), prompts, args)
        nbytes = weight_bytes(variant)
        r["weight_gb_s"] = nbytes / r["step_s"] / 1e9
        first = first or r
        lines.append(f"{name:>14}  {nbytes / 1e9:>10.2f}  {r['tok_s']:>7.1f}  {r['weight_gb_s']:>12.1f}  "
                     f"{nbytes / r['step_s'] / copy:>7.1%}  {r['ttft_ms']:>7.1f}  {r['tok_s'] / first['tok_s']:>7.2f}x")
    if args.json is not None:
        memory = peak_memory_gb(args.device) if rank is None else max_over_ranks(peak_memory_gb(args.device))
        if not rank:
            args.json.write_text(json.dumps(dict(tok_s=first["tok_s"], weight_gb_s=first["weight_gb_s"],
                                                 memory_gb=memory)))
    return "\n".join(lines)


def torchrun_decode(ranks: int, flags: list):
    """`decode` with these flags as a torchrun job of `ranks` processes: rank 0's figures, or why it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={ranks}", __file__, "decode", *flags, "--json", str(result)],
                             capture_output=True, text=True)
        if job.returncode == 0:
            return json.loads(result.read_text())
    errors = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    return errors[0] if errors else "failed: " + job.stderr.strip()[-300:]


def tp_bench(args) -> str:
    """decode's tok/s at 1, 2, 4 and 8 ranks, as many as there are GPUs (CPU cores on CPU), one job after the other;
    the speed-up is over the 1-rank job of the same run."""
    on_cuda = torch.device(args.device).type == "cuda"
    gpus = torch.cuda.device_count() if on_cuda else os.cpu_count()
    lines = [header(args.device), f"{described(args, args.checkpoint_path or args.model_name)}, tensor parallel",
             f"{'ranks':>5}  {'tok/s':>8}  {'speed-up':>8}  {'GB/s per rank':>13}  {'peak GB per rank':>16}"]
    one = None
    for n in [n for n in (1, 2, 4, 8) if n <= gpus]:
        r = torchrun_decode(n, args.flags)
        if isinstance(r, str):
            lines.append(f"{n:>5}  {r}")
            continue
        one = one or (r["tok_s"] if n == 1 else None)
        speed_up = f"{r['tok_s'] / one:.2f}x" if one else "-"
        lines.append(f"{n:>5}  {r['tok_s']:>8.1f}  {speed_up:>8}  {r['weight_gb_s']:>13.1f}  {r['memory_gb']:>16.2f}")
    if gpus < 8:
        lines.append(f"({gpus} {'GPUs' if on_cuda else 'CPU cores'} here: more ranks need a machine with more)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# speculative and medusa: plain decoding against another decoder, through `compare`.

def draft_pairs(args, target):
    """(name, target, draft): the --draft_checkpoint_path model; an int4 (group 32) copy of an unquantized target, as
    gpt-fast shows; an any-precision target (the checkpoint, or a copy of random weights) drafting with its own
    weights at --draft_precision bits."""
    if args.draft_checkpoint_path is not None:
        dtype = getattr(torch, args.dtype)
        draft = speculative.load_draft(target, args.draft_checkpoint_path, None, args.device, dtype)
        yield f"{args.draft_checkpoint_path.parent.name} drafts", target, draft
    if isinstance(target.layers[0].attention.wqkv, nn.Linear):  # not quantized already
        yield "int4 g32 copy drafts", target, quantize.quantize_model(uncached_copy(target), "int4", 32)
    is_anyprec = isinstance(target.layers[0].attention.wqkv, anyprec.AnyPrecLinear)
    if is_anyprec or args.checkpoint_path is None:  # its own weights at fewer bits draft for it
        target = target if is_anyprec else anyprec_copy(target)
        draft = speculative.load_draft(target, None, args.draft_precision)
        yield f"{args.draft_precision}-bit self drafts", target, draft


def speculative_bench(args) -> str:
    target, what = load_or_random(args)
    prompts = bench_prompts(args, target.config.vocab_size)
    lines = [header(args.device), f"target {described(args, what)}, speculate_k {args.speculate_k}",
             f"{'draft':>24}  {'plain tok/s':>11}  {'spec. tok/s':>11}  {'ratio':>6}  {'tokens/fwd':>10}  "
             f"accepted drafts"]
    for name, pair_target, draft in draft_pairs(args, target):
        torch._dynamo.reset()  # each pair compiles its own graphs
        decoder = speculative.decoder(pair_target, draft, args.speculate_k, args.temperature, compile=args.compile)
        r = compare(args, pair_target, prompts, decoder)
        lines.append(f"{name:>24}  {r['plain']:>11.1f}  {r['tok_s']:>11.1f}  {r['ratio']:>5.2f}x  "
                     f"{r['tokens_per_step']:>10.2f}  {r['histogram']}")
    return "\n".join(lines)


def medusa_bench(args) -> str:
    """Heads: --medusa_heads, else medusa_heads.safetensors beside the checkpoint, else zero-initialised heads (they
    propose the model's own next token) on mc_sim_7b_63, to measure the tree's overhead."""
    model, what = load_or_random(args)
    beside = args.checkpoint_path and args.checkpoint_path.parent / "medusa_heads.safetensors"
    if args.medusa_heads or (beside and beside.is_file()):
        heads, tree = medusa.load(args.medusa_heads or beside, model, args.medusa_tree)
    else:
        heads = medusa.MedusaHeads(model.config.dim, 4).to(args.device, model.tok_embeddings.weight.dtype)
        tree = medusa.load_tree(args.medusa_tree, {}, 4, args.device)
    prompts = bench_prompts(args, model.config.vocab_size)
    r = compare(args, model, prompts, medusa.decoder(model, heads, tree, args.temperature, compile=args.compile))
    rows = [("model", described(args, what)),
            ("medusa", f"{len(heads.blocks)} heads, tree of {tree.parent.numel()} nodes, depth {tree.num_heads}"),
            ("plain decode", f"{r['plain']:.1f} tok/s"),
            ("medusa decode", f"{r['tok_s']:.1f} tok/s"),
            ("speed-up", f"{r['ratio']:.2f}x"),
            ("tokens per forward", f"{r['tokens_per_step']:.2f} (accepted candidates: {r['histogram']})"),
            ("step time", f"{r['step_ratio']:.2f}x a plain decode step")]
    for mode in args.mode:  # quantized copies, the same heads and tree: their Medusa step over this model's
        copy = quantize.quantize_model(uncached_copy(model), mode, args.groupsize)
        q = compare(args, copy, prompts, medusa.decoder(copy, heads, tree, args.temperature, compile=args.compile))
        name = mode if mode == "int8" else f"{mode} g{args.groupsize}"
        rows.append((f"{name} medusa", f"{q['step_s'] / r['step_s']:.2f}x the Medusa step above "
                     f"({q['tok_s']:.1f} tok/s; {q['step_ratio']:.2f}x its plain step)"))
        del copy
    return "\n".join([header(args.device)] + [f"{name:>20}: {value}" for name, value in rows])


# ---------------------------------------------------------------------------------------------------------------
# kernels: GPU micro-benchmark of every GEMV on a model's layer shapes.

def time_per_call(fn, args_list: list, repeats: int = 20) -> float:
    """Median seconds per fn(*args), from CUDA-graph replays of one call per entry of args_list: the entries hold
    copies of the weights that together exceed L2, so each call reads its weights from memory, as decode does."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture: builds kernels, picks cuBLAS algorithms
        for args in args_list:
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in args_list:
            fn(*args)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(args_list))
    return statistics.median(times)


def kernel_candidates(groupsize: int, tokens: int) -> list:
    """(name, make(w bf16 [N, K]) -> weight tensors, run(x, *tensors)) for every kernel timed at `tokens` tokens. A new
    kernel is one more entry. quantize's ops run the kernel quantize.linear_kernel picks (named), with the counters a
    module keeps for its tensor-core kernel."""
    def locked(quantizer):
        return lambda w: [*quantizer(w), quantize.mma_locks(w.shape[0], w.device)]
    return [
        (f"int8 {quantize.linear_kernel(tokens, False)}", locked(quantize.quantize_int8),
         torch.ops.quantize.int8_linear),
        (f"int4 {quantize.linear_kernel(tokens, True)} g{groupsize}",
         locked(lambda w: quantize.quantize_int4(w, groupsize)), torch.ops.quantize.int4_linear),
    ] + [anyprec_candidate(p) for p in range(anyprec.MIN_BITS, anyprec.MAX_BITS + 1)]


def anyprec_candidate(bits: int):
    """The any-precision GEMV at `bits`, on random `bits`-bit codes (anyprec.pack) and an fp16 table of that width:
    what one call reads at that precision."""
    def make(w):
        codes = torch.randint(0, 2**bits, w.shape, dtype=torch.uint8, device=w.device)
        return [anyprec.pack(codes, bits), torch.randn(w.shape[0], 2**bits, device=w.device).mul(0.02).half()]

    def run(x, planes, lut):  # what AnyPrecLinear runs: the GEMV up to 8 tokens, else dequantize and matmul
        if x.shape[0] <= anyprec.GEMV_MAX_TOKENS:
            return torch.ops.anyprec.gemv(x, planes, lut, bits)
        return torch.matmul(x, torch.ops.anyprec.dequant(planes, lut, bits, x.dtype).t())
    return f"anyprec {bits}-bit", make, run


def int4pack(w, groupsize: int) -> list:
    """torch's own int4 format (tinygemm's, for _weight_int4pack_mm) of quantize_int4's codes, scales and zeros: the
    same w = (q - 8) * scale + zero, in torch's layout (even k in the high nibble, tiled; scales [K/g, N, 2])."""
    weight, scales_and_zeros = quantize.quantize_int4(w, groupsize)
    codes = quantize.unpack_int4(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).contiguous(), 8)
    return [packed, scales_and_zeros.transpose(0, 1).contiguous()]


def kernels_bench(args) -> str:
    """Every kernel against bf16 torch.matmul and torch.ops.aten._weight_int4pack_mm on each layer shape of
    --model_names (default --model_name), at each of --tokens (default --batch_size), all in this one run: time per
    call, weight GB/s, and how many times faster than each baseline."""
    lines = [header(args.device)]
    for model_name in args.model_names or [args.model_name]:
        for tokens in args.tokens or [args.batch_size]:
            lines += kernels_table(args, model_name, tokens)
    return "\n".join(lines)


def kernels_table(args, model_name: str, M: int) -> list:
    device, g = args.device, args.groupsize
    c = ModelArgs.from_name(model_name)
    shapes = {"wqkv": ((c.n_head + 2 * c.n_kv_heads) * c.head_dim, c.dim), "wo": (c.dim, c.n_head * c.head_dim),
              "w1, w3": (c.intermediate_size, c.dim), "w2": (c.dim, c.intermediate_size)}
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    baselines = [("bf16 matmul", lambda w: [w], lambda x, w: torch.matmul(x, w.t())),
                 (f"int4pack_mm g{g}", lambda w: int4pack(w, g),
                  lambda x, packed, sz: torch.ops.aten._weight_int4pack_mm(x, packed, g, sz))]
    lines = [f"{model_name} layers, {M} token(s): time per call (CUDA-graph replay over weight copies larger than L2, "
             f"median of 20), weight bytes read per second, speed-up over each baseline",
             f"{'layer':>7} {'N x K':>13}  {'kernel':>18}  {'us':>7}  {'GB/s':>7}  {'vs bf16':>7}  {'vs int4pack':>11}"]
    for layer, (N, K) in shapes.items():
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        timings = {}  # name: (seconds per call, weight bytes)
        for name, make, run in baselines + kernel_candidates(g, M):
            tensors = make(w)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            copies = [tensors] + [[t.clone() for t in tensors] for _ in range(4 * l2 // nbytes)]
            timings[name] = time_per_call(lambda *t: run(x, *t), copies), nbytes
            del copies
        (bf16, _), (int4pack_mm, _) = timings[baselines[0][0]], timings[baselines[1][0]]
        for name, (seconds, nbytes) in timings.items():
            lines.append(f"{layer:>7} {f'{N} x {K}':>13}  {name:>18}  {seconds * 1e6:>7.1f}  "
                         f"{nbytes / seconds / 1e9:>7.0f}  {bf16 / seconds:>6.2f}x  {int4pack_mm / seconds:>10.2f}x")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# cpu: this project against gpt-fast's generate.py and transformers' generate on the CPU, on the same weights (a random
# model of --model_name's shape with --n_layer layers, and the shipped tiny model): greedy, batch 1, each system's best
# of --runs, the systems interleaved round by round; the fraction of the measured read bandwidth each row reaches.
# gpt-fast runs from a checkout outside this repository (--gpt_fast) in a process of its own,
# scripts/gpt_fast_worker.py: its modules are named model, generate and quantize, as ours are. Prints a README table.

CPU_FORMATS = ["float32", "bfloat16", "int8", "int4"]
TINY = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-py" / "model.pth"
GPT_FAST_WORKER = Path(__file__).resolve().parent / "gpt_fast_worker.py"


def read_bandwidth(nbytes=1 << 30) -> float:
    """Bytes per second a sum reads from a tensor far beyond the caches: the ceiling of a decode step here."""
    t = torch.ones(nbytes // 4)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times)


def cpu_name() -> str:
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"{names[0] if names else platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def our_runner(model, fmt: str, compile: bool, args):
    """(bytes a step reads, run() -> decode tok/s of one greedy generation) for this project in format fmt: int8 and
    int4 run in a bf16 model, as gpt-fast's do."""
    variant = uncached_copy(model).to(torch.float32 if fmt == "float32" else torch.bfloat16)
    if fmt in ("int8", "int4"):
        variant = quantize.quantize_model(variant, fmt, args.groupsize)
    decoder = plain_decoder(variant, compile=compile)
    prompt = [torch.randint(0, model.config.vocab_size, (16,)).tolist()]

    def run():
        stats = generate(variant, prompt, args.max_new_tokens, decoder=decoder)[1]
        return stats["decode_tokens"] / stats["decode_time"]
    return weight_bytes(variant), run


def hf_runner(model, fmt: str, args):
    """run() -> decode tok/s of transformers' LlamaForCausalLM.generate, eager (its standard path), on the same
    weights: (n - 1) tokens over the time of generating n less that of generating 1 (the prefill)."""
    import transformers
    from convert_hf_checkpoint import to_hf
    c = model.config
    config = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.intermediate_size,
                                      num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                                      num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
                                      rope_theta=c.rope_base, max_position_embeddings=c.block_size,
                                      tie_word_embeddings=c.tie_embeddings)
    dtype = torch.float32 if fmt == "float32" else torch.bfloat16
    hf = transformers.LlamaForCausalLM(config).to(dtype).eval()
    hf.load_state_dict({k: v.to(dtype) for k, v in to_hf(uncached_copy(model).state_dict(), c).items()}, strict=False)
    ids = torch.randint(0, c.vocab_size, (1, 16))

    def seconds(n):
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    def run():
        return (args.max_new_tokens - 1) / (seconds(args.max_new_tokens) - seconds(1))
    return run


def save_for_gpt_fast(model: Transformer, folder: Path):
    """The weights (our key names are gpt-fast's) and gpt-fast's ModelArgs fields, for gpt_fast_worker.py. A tied
    model's head is saved as its own tensor, equal to the embedding: gpt-fast has no tying, and reads the same bytes."""
    c = model.config
    if c.head_dim != c.dim // c.n_head or c.rope_scaling is not None or c.sliding_window is not None:
        raise ValueError(f"gpt-fast's model cannot run {c}: it takes head_dim = dim // n_head, and has neither RoPE "
                         f"scaling nor a sliding window")
    fields = dict(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, dim=c.dim,
                  intermediate_size=c.intermediate_size, n_local_heads=c.n_kv_heads, rope_base=c.rope_base,
                  norm_eps=c.norm_eps)
    (folder / "model_args.json").write_text(json.dumps(fields))
    torch.save({k: v.clone() for k, v in uncached_copy(model).state_dict().items()}, folder / "model.pth")


@contextlib.contextmanager
def gpt_fast_runner(folder: Path, fmt: str, compile: bool, args):
    """run() -> decode tok/s of gpt-fast's own generate() on the weights in folder, in format fmt, from a worker
    process; or the reason gpt-fast cannot run fmt here (a str)."""
    command = [sys.executable, str(GPT_FAST_WORKER), str(args.gpt_fast), str(folder), fmt, "--groupsize",
               str(args.groupsize), "--max_new_tokens", str(args.max_new_tokens)] + ["--compile"] * compile
    worker = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def reply() -> dict:
        line = worker.stdout.readline()
        if not line:
            raise RuntimeError(f"gpt-fast's worker ended with code {worker.wait()} (its error is above): {command}")
        return json.loads(line)

    def run():
        worker.stdin.write("go\n")
        worker.stdin.flush()
        return reply()["tok_s"]
    try:
        status = reply()
        yield run if status.get("ready") else status["unsupported"]
    finally:
        worker.stdin.close()
        worker.wait()


def rounds(runners: dict, runs: int) -> dict:
    """Each runner's tok/s in each of `runs` rounds, a round running every runner once, in turn, every other round in
    reverse order (no system always runs first); after a warm-up."""
    for run in runners.values():
        run()  # warm-up: compiles
    tok_s = {name: [] for name in runners}
    for i in range(runs):
        for name, run in list(runners.items())[:: -1 if i % 2 else 1]:
            tok_s[name].append(run())
    return tok_s


def cpu_models(args) -> dict:
    """The models `cpu` runs, by the name its table gives them, in fp32."""
    shape = ModelArgs(**{**vars(ModelArgs.from_name(args.model_name)), "n_layer": args.n_layer})
    return {f"{args.model_name} shape, {args.n_layer} layers": random_model(shape, "cpu", torch.float32),
            "tiny-py (shipped)": load_model(TINY, "cpu", torch.float32)}


def systems_rounds(model, gpt_fast_weights: Path, fmt: str, compile: bool, args) -> tuple[int, dict, str]:
    """(bytes our step reads, each system's tok/s a round, why gpt-fast cannot run fmt or None) in one format and mode:
    ours, transformers' where it applies, gpt-fast's with --gpt_fast."""
    torch._dynamo.reset()
    nbytes, ours = our_runner(model, fmt, compile, args)
    runners = {"ours": ours}
    if fmt in ("float32", "bfloat16") and not compile and not args.no_transformers:
        runners["transformers"] = hf_runner(model, fmt, args)
    worker = gpt_fast_runner(gpt_fast_weights, fmt, compile, args) if args.gpt_fast else contextlib.nullcontext()
    with worker as gpt_fast:  # run(), why gpt-fast cannot run fmt, or None
        if callable(gpt_fast):
            runners["gpt-fast"] = gpt_fast
        return nbytes, rounds(runners, args.runs), gpt_fast if isinstance(gpt_fast, str) else None


@torch.no_grad()
def cpu_bench(args) -> str:
    before = read_bandwidth()
    models = cpu_models(args)
    systems = ["ours"] + ["transformers"] * (not args.no_transformers) + ["gpt-fast"] * (args.gpt_fast is not None)
    lines = [f"CPU decode, {cpu_name()} | torch {torch.__version__} | transformers "
             f"{__import__('transformers').__version__} | {datetime.date.today().isoformat()}",
             f"greedy, batch 1, {args.max_new_tokens} new tokens; int4 g{args.groupsize}; transformers eager, fp32 and "
             f"bf16 only; {f'gpt-fast from {args.gpt_fast}' if args.gpt_fast else 'no gpt-fast rows (no --gpt_fast)'}",
             f"each model, mode and format in turn; within it, after a warm-up of each system, {args.runs} rounds of "
             f"{' then '.join(systems)} (every other round in reverse): each system's best round, and its median",
             "GB/s read: the bytes our step reads in that format x tok/s; read bandwidth: the better of two sums of "
             "a 1 GiB tensor, before and after the rows, "]
    rows = []  # (model, system, format, mode, best tok/s, median tok/s, bytes a step, best of our fp32 eager)
    cannot = {}  # why gpt-fast cannot run a format -> the model, format and mode it was asked for
    for what, model in models.items():
        with tempfile.TemporaryDirectory() as folder:
            if args.gpt_fast:
                save_for_gpt_fast(model, Path(folder))
            base = None
            for mode, compile in [("eager", False), ("compiled", True)][:1 + args.compile]:
                for fmt in args.formats:
                    nbytes, tok_s, why = systems_rounds(model, Path(folder), fmt, compile, args)
                    if why:
                        cannot.setdefault(why, []).append(f"{what} {fmt} {mode}")
                    base = base or max(tok_s["ours"])
                    for name, runs in tok_s.items():
                        rows.append((what, name, fmt, mode, max(runs), statistics.median(runs), nbytes, base))
                        print(rows[-1], file=sys.stderr, flush=True)  # progress: the table comes at the end
    after = read_bandwidth()  # the machine's bandwidth drifts (other tenants): the ceiling is the better reading
    bandwidth = max(before, after)
    lines[-1] += f"{before / 1e9:.1f} and {after / 1e9:.1f} GB/s"
    lines += ["", "| model | system | format | mode | tok/s | median | GB/s read | of read bandwidth | vs our fp32 eager |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {what} | {name} | {fmt} | {mode} | {tok_s:.1f} | {median:.1f} | {tok_s * nbytes / 1e9:.1f} | "
              f"{tok_s * nbytes / bandwidth:.0%} | {tok_s / base:.2f}x |"
              for what, name, fmt, mode, tok_s, median, nbytes, base in rows]
    lines += [""] + [f"gpt-fast could not run {', '.join(runs)}: {why}" for why, runs in cannot.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv=None):
    shape = argparse.ArgumentParser(add_help=False)  # what `kernels` needs
    shape.add_argument("--model_name", default="Llama-2-7b-chat-hf", help="a name from model.py's registry")
    shape.add_argument("--device", default=default_device())
    shape.add_argument("--batch_size", type=int, default=1)
    run = argparse.ArgumentParser(add_help=False, parents=[shape])  # what every decoding benchmark needs
    run.add_argument("--checkpoint_path", type=Path, default=None, help="real weights instead of random ones")
    run.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    run.add_argument("--max_new_tokens", type=int, default=200)
    run.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up; the median is reported")
    run.add_argument("--compile", action="store_true")
    run.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)

    def command(name, fn, parent, help):
        q = commands.add_parser(name, parents=[parent], help=help)
        q.set_defaults(fn=fn)
        return q
    decode = command("decode", decode_bench, run, "decode speed against the copy bandwidth, quantized copies too")
    kernels = command("kernels", kernels_bench, shape, "every GEMV kernel against torch's on the model's layer shapes")
    decode.add_argument("--mode", nargs="+", default=[], choices=[*quantize.MODES, "anyprec"],
                        help="also quantized in memory (anyprec: one copy, each --precision)")
    decode.add_argument("--precision", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8], help="for --mode anyprec")
    decode.add_argument("--json", type=Path, default=None, help="also write the model's figures to this file")
    for q in (decode, kernels):
        q.add_argument("--groupsize", type=int, default=128, help="of int4")
    kernels.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts, all in this run "
                         "(default: --batch_size)")
    kernels.add_argument("--model_names", nargs="+", default=None, help="models whose layer shapes to time, all in "
                         "this run (default: --model_name)")
    spec = command("speculative", speculative_bench, run, "plain vs speculative decoding, for each draft")
    spec.add_argument("--draft_checkpoint_path", type=Path, default=None)
    spec.add_argument("--speculate_k", type=int, default=5)
    spec.add_argument("--draft_precision", type=int, default=3, help="the any-precision pair's draft width")
    heads = command("medusa", medusa_bench, run, "plain vs Medusa decoding")
    heads.add_argument("--medusa_heads", type=Path, default=None, help="default: beside --checkpoint_path")
    heads.add_argument("--medusa_tree", default=None, help="mc_sim_7b_63 or a JSON file (default: the heads' tree)")
    heads.add_argument("--mode", nargs="+", default=[], choices=["int8", "int4"],
                       help="also copies quantized in memory, same heads and tree: their Medusa step time over this "
                            "model's")
    heads.add_argument("--groupsize", type=int, default=128, help="of int4")
    command("tp", tp_bench, run, "decode at 1, 2, 4, 8 ranks (torchrun), as many as there are GPUs")
    cpu = command("cpu", cpu_bench, argparse.ArgumentParser(add_help=False),
                  "this project against gpt-fast and transformers on the CPU, every format")
    cpu.add_argument("--model_name", default="TinyLlama-1.1B", help="the random model's shape, from the registry")
    cpu.add_argument("--n_layer", type=int, default=4, help="of the random model (TinyLlama has 22)")
    cpu.add_argument("--formats", nargs="+", default=CPU_FORMATS, choices=CPU_FORMATS)
    cpu.add_argument("--groupsize", type=int, default=128, help="of int4")
    cpu.add_argument("--max_new_tokens", type=int, default=24)
    cpu.add_argument("--runs", type=int, default=3, help="each system's best of this many, interleaved")
    cpu.add_argument("--compile", action="store_true", help="also compiled rows (ours and gpt-fast's)")
    cpu.add_argument("--no_transformers", action="store_true")
    cpu.add_argument("--gpt_fast", type=Path, default=None, help="a checkout of pytorch-labs/gpt-fast, outside this "
                     "repository (README: Benchmarks); without it, no gpt-fast rows")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.flags = argv[1:]  # tp runs `decode` with the same flags
    torch.manual_seed(0)  # every rank alike: the same prompts, and the same tokens sampled
    print(args.fn(args))


if __name__ == "__main__":
    cli.run(main)
