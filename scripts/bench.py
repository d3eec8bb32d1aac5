"""Decode speed on random weights of any registry shape (nothing to download), against the device's own copy
bandwidth, measured in the same run.

    python scripts/bench.py --model_name Llama-2-7b-chat-hf --compile          # batch 1, 200 new tokens
    python scripts/bench.py --checkpoint_path checkpoints/tiny-py/model.pth    # real weights, any device
    python scripts/bench.py --model_name Llama-2-7b-chat-hf --compile --tp     # 1, 2, 4, 8 GPUs (tensor parallel)

Decode at batch 1 reads every weight once per token, so weight bytes x tokens/s is the bandwidth it achieves; the
fraction of the measured copy bandwidth (bytes read + written per second) is how close to the hardware it runs.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from copy import deepcopy
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from generate import (compile_fns, default_device, generate, load_model, peak_memory_gb, sync,  # noqa: E402
                      weight_bytes)
from model import ModelArgs, Transformer  # noqa: E402
import anyprec  # noqa: E402
from tp import apply_tp, max_over_ranks, maybe_init_dist  # noqa: E402


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


def random_anyprec_model(config: ModelArgs, device, dtype, seed=3, parent=8) -> Transformer:
    """Random any-precision weights built directly, without k-means: uniform random parent codes, sorted random
    parent tables, and each narrower table the mean of its two children (what upscaling leaves). For speed, and for
    the acceptance of one width drafting for another of the same weights."""
    model = random_model(config, device, dtype)
    state = model.state_dict()
    for name, module in model.named_modules():
        if name.endswith(anyprec.QUANTIZED):
            N, K = state.pop(f"{name}.weight").shape
            codes = torch.randint(0, 2**parent, (N, K), dtype=torch.uint8, device=device)
            state[f"{name}.qweight"] = anyprec.pack(codes, parent)
            lut = torch.randn(N, 2**parent, device=device).mul_(0.02).sort(dim=1).values
            for p in range(parent, seed - 1, -1):
                state[f"{name}.lut{p}"] = lut.half()
                lut = lut.view(N, -1, 2).mean(-1)
    anyprec.swap_linears(model, {"mode": "anyprec", "seed_precision": seed, "parent_precision": parent})
    model.load_state_dict(state, assign=True)
    return model


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


def decode_speed(model, prompt_len=16, max_new_tokens=200, batch_size=1, compile=False, runs=3) -> dict:
    """Median decode steps/s over `runs` generations of exactly max_new_tokens (no stop id), after a warm-up."""
    device = model.tok_embeddings.weight.device
    prompts = [torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist()] * batch_size
    model.setup_caches(batch_size, prompt_len + max_new_tokens)
    prefill_fn, decode_fn = compile_fns(compile, False)
    generate(model, prompts, max_new_tokens, prefill_fn=prefill_fn, decode_fn=decode_fn)  # warm-up (compiles)
    rates, ttfts = [], []
    for _ in range(runs):
        _, stats = generate(model, prompts, max_new_tokens, prefill_fn=prefill_fn, decode_fn=decode_fn)
        rates.append(stats["decode_steps"] / stats["decode_time"])
        ttfts.append(stats["ttft"])
    steps_per_s = statistics.median(rates)
    return dict(tok_s=steps_per_s * batch_size, steps_s=steps_per_s, weight_gb_s=weight_bytes(model) * steps_per_s / 1e9,
                ttft_ms=1000 * statistics.median(ttfts))


def speculative_speed(target, draft, prompts, speculate_k, max_new_tokens=200, temperature=0.0, compile=False,
                      runs=3) -> dict:
    """Plain and speculative decoding of the same prompts in one run: median tok/s of each after a warm-up (no stop
    id, exactly max_new_tokens), their ratio, and the mean tokens per target forward with the acceptance histogram."""
    import speculative
    plain_fns, spec_fns = compile_fns(compile, False), speculative.compile_fns(compile, False)
    target.setup_caches(len(prompts), max(map(len, prompts)) + max_new_tokens + speculate_k + 1)
    runs_of = {
        "plain": lambda: generate(target, prompts, max_new_tokens, temperature=temperature, prefill_fn=plain_fns[0],
                                  decode_fn=plain_fns[1]),
        "speculative": lambda: speculative.generate(target, prompts, max_new_tokens, draft=draft,
                                                    speculate_k=speculate_k, temperature=temperature,
                                                    prefill_fn=spec_fns[0], decode_fn=spec_fns[1]),
    }
    result, accepted = {}, [0] * (speculate_k + 1)
    for name, run in runs_of.items():
        run()  # warm-up (compiles)
        rates = []
        for _ in range(runs):
            _, stats = run()
            rates.append(stats.get("decode_tokens", stats["decode_steps"] * len(prompts)) / stats["decode_time"])
            if "accepted" in stats:
                accepted = [a + b for a, b in zip(accepted, stats["accepted"])]
        result[name] = statistics.median(rates)
    mean, histogram = speculative.acceptance_summary(accepted)
    return dict(plain=result["plain"], speculative=result["speculative"],
                ratio=result["speculative"] / result["plain"], tokens_per_forward=mean, histogram=histogram)


def draft_pairs(args, target, dtype) -> list:
    """(name, target, draft) for --speculative: the --draft_checkpoint_path model; an int4 (group 32) copy of an
    unquantized target, as gpt-fast shows; an any-precision target (the checkpoint, or random weights) drafting
    with its own weights at --draft_precision bits."""
    from speculative import load_draft
    pairs = []
    if args.draft_checkpoint_path is not None:
        draft = load_draft(target, args.draft_checkpoint_path, device=args.device, dtype=dtype)
        pairs.append((f"{args.draft_checkpoint_path.parent.name} drafts", target, draft))
    if isinstance(target.layers[0].attention.wqkv, torch.nn.Linear):  # not quantized already
        from quantize import quantize_model
        int4 = quantize_model(deepcopy(target), "int4", groupsize=32)
        pairs.append(("int4 g32 copy drafts", target, int4))
    anyprec_target = target if isinstance(target.layers[0].attention.wqkv, anyprec.AnyPrecLinear) else (
        random_anyprec_model(target.config, args.device, dtype) if args.checkpoint_path is None else None)
    if anyprec_target is not None:  # its own weights at fewer bits draft for it
        draft = load_draft(anyprec_target, precision=args.draft_precision)
        pairs.append((f"{args.draft_precision}-bit self drafts", anyprec_target, draft))
    return pairs


def bench_prompts(args, vocab_size, prompt_len=16) -> list:
    """One prompt per row: the opening of a held-out stdlib file when the checkpoint has a tokenizer, else random."""
    if args.checkpoint_path is not None and any(args.checkpoint_path.parent.glob("tokenizer.*")):
        from eval import stdlib_texts
        from tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.checkpoint_path.parent)
        return [tokenizer.encode(text, bos=True)[:prompt_len] for text in stdlib_texts("heldout")[:args.batch_size]]
    return torch.randint(0, vocab_size, (args.batch_size, prompt_len)).tolist()


def speculative_report(args, target, what, dtype) -> str:
    prompts = bench_prompts(args, target.config.vocab_size)
    columns = f"{'draft':>24}  {'plain tok/s':>11}  {'spec. tok/s':>11}  {'ratio':>6}  {'tokens/fwd':>10}"
    lines = [header(args.device), f"target {what} ({args.dtype}, batch {args.batch_size}, "
             f"{'compiled' if args.compile else 'eager'}), speculate_k {args.speculate_k}, temperature "
             f"{args.temperature}, {args.max_new_tokens} new tokens", columns + "  accepted drafts"]
    for name, target, draft in draft_pairs(args, target, dtype):
        torch._dynamo.reset()  # each pair compiles its own graphs
        r = speculative_speed(target, draft, prompts, args.speculate_k, args.max_new_tokens, args.temperature,
                              args.compile, args.runs)
        lines.append(f"{name:>24}  {r['plain']:>11.1f}  {r['speculative']:>11.1f}  {r['ratio']:>5.2f}x  "
                     f"{r['tokens_per_forward']:>10.2f}  {r['histogram']}")
    return "\n".join(lines)


def medusa_report(args, model, what) -> str:
    """Plain and Medusa decoding of the same prompts in one run (median of --runs after a warm-up, exactly
    --max_new_tokens): tok/s of each, their ratio, tokens per base forward, and the Medusa step's time over a plain
    step's. Heads: --medusa_heads, else medusa_heads.safetensors beside the checkpoint, else zero-initialised heads
    (they propose the base model's own next token) on mc_sim_7b_63, to measure the tree's overhead."""
    import medusa
    from speculative import acceptance_summary
    heads_path = args.medusa_heads
    if heads_path is None and args.checkpoint_path is not None:
        heads_path = args.checkpoint_path.parent / "medusa_heads.safetensors"
    if heads_path is not None and heads_path.is_file():
        kwargs = medusa.load(heads_path, model)
    else:
        heads = medusa.MedusaHeads(model.config.dim, 4).to(args.device, model.output.weight.dtype)
        kwargs = dict(heads=heads, tree=medusa.build_tree(medusa.MC_SIM_7B_63, 4, args.device))
    prompts = bench_prompts(args, model.config.vocab_size)
    plain_fns, medusa_fns = compile_fns(args.compile, False), medusa.compile_fns(args.compile, False)
    runs_of = {
        "plain": lambda: generate(model, prompts, args.max_new_tokens, temperature=args.temperature,
                                  prefill_fn=plain_fns[0], decode_fn=plain_fns[1]),
        "medusa": lambda: medusa.generate(model, prompts, args.max_new_tokens, temperature=args.temperature,
                                          prefill_fn=medusa_fns[0], decode_fn=medusa_fns[1], **kwargs),
    }
    tok_s, step_s = {}, {}
    for name, run in runs_of.items():
        run()  # warm-up (compiles)
        stats = [run()[1] for _ in range(args.runs)]
        tok_s[name] = statistics.median(s.get("decode_tokens", s["decode_steps"] * len(prompts)) / s["decode_time"]
                                        for s in stats)
        step_s[name] = statistics.median(s["decode_time"] / s["decode_steps"] for s in stats)
    mean, histogram = acceptance_summary([sum(c) for c in zip(*(s["accepted"] for s in stats))])  # Medusa's runs
    tree = kwargs["tree"]
    rows = [
        ("model", f"{what} ({args.dtype}, batch {len(prompts)}, {'compiled' if args.compile else 'eager'}, "
                  f"temperature {args.temperature}, {args.max_new_tokens} new tokens)"),
        ("medusa", f"{len(kwargs['heads'].blocks)} heads, tree of {tree.parent.numel()} nodes, depth {tree.num_heads}"),
        ("plain decode", f"{tok_s['plain']:.1f} tok/s"),
        ("medusa decode", f"{tok_s['medusa']:.1f} tok/s"),
        ("speed-up", f"{tok_s['medusa'] / tok_s['plain']:.2f}x"),
        ("tokens per forward", f"{mean:.2f} (accepted candidates: {histogram})"),
        ("step time", f"{step_s['medusa'] / step_s['plain']:.2f}x a plain decode step"),
    ]
    return "\n".join([header(args.device)] + [f"{name:>20}: {value}" for name, value in rows])


def quantized_copy(model, mode: str, groupsize: int):
    """A quantized copy of `model`, made on its device as quantize.py would write it (int4-gptq calibrates on random
    tokens: enough to time it, its storage and kernels being int4's)."""
    from quantize import quantize_model
    if mode == "anyprec":  # random codes and tables: decode speed does not depend on their values
        return random_anyprec_model(model.config, model.output.weight.device, model.output.weight.dtype)
    seq_len = min(256, model.config.block_size)
    windows = torch.randint(0, model.config.vocab_size, (8, seq_len)) if mode == "int4-gptq" else None
    return quantize_model(deepcopy(model), mode, groupsize, windows)


def quantized_report(args, model, what) -> str:
    """The model as loaded, then each quantized --mode, decoded in one run: tok/s, weight bytes read per second, their
    fraction of the copy bandwidth measured in the same run, and the speed-up over the unquantized model."""
    copy = copy_bandwidth(args.device)
    lines = [header(args.device), f"{what}, batch {args.batch_size}, {'compiled' if args.compile else 'eager'}, "
             f"{args.max_new_tokens} new tokens; copy bandwidth {copy / 1e9:.1f} GB/s (read + written)",
             f"{'mode':>14}  {'weights GB':>10}  {'tok/s':>7}  {'weights GB/s':>12}  {'of copy':>7}  {'speed-up':>8}"]
    base = None
    for mode in [args.dtype] + [m for m in args.mode if m != "bf16"]:
        torch._dynamo.reset()  # each model compiles its own graphs
        quantized = model if mode == args.dtype else quantized_copy(model, mode, args.groupsize)
        for precision in args.precision if mode == "anyprec" else [None]:  # one any-precision copy, every width
            if precision is not None:
                anyprec.set_precision(quantized, precision)  # one more compiled graph (and CUDA graph) each
            r = decode_speed(quantized, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             compile=args.compile, runs=args.runs)
            base = base or r["tok_s"]
            name = (mode if mode in (args.dtype, "int8") else f"anyprec {precision}-bit" if precision
                    else f"{mode} g{args.groupsize}")
            lines.append(f"{name:>14}  {weight_bytes(quantized) / 1e9:>10.2f}  {r['tok_s']:>7.1f}  "
                         f"{r['weight_gb_s']:>12.1f}  {r['weight_gb_s'] * 1e9 / copy:>7.1%}  "
                         f"{r['tok_s'] / base:>7.2f}x")
        del quantized
    return "\n".join(lines)


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


def kernel_candidates(groupsize: int) -> list:
    """(name, make(w bf16 [N, K]) -> weight tensors, run(x, *tensors)) for every kernel --kernels times. A new
    kernel is one more entry."""
    import quantize
    return [
        ("int8 gemv", quantize.quantize_int8, torch.ops.quantize.int8_linear),
        (f"int4 gemv g{groupsize}", lambda w: quantize.quantize_int4(w, groupsize), torch.ops.quantize.int4_linear),
    ] + [anyprec_candidate(p) for p in range(anyprec.MIN_BITS, anyprec.MAX_BITS + 1)]


def anyprec_candidate(bits: int):
    """The any-precision GEMV at `bits`: it reads `bits` random bitplanes and the fp16 table of that width (the
    bytes timed are exactly those; the planes of wider widths are never read)."""
    def make(w):
        N, K = w.shape
        planes = torch.randint(-2**31, 2**31, (bits, N, anyprec.padded(K) // 32), dtype=torch.int32, device=w.device)
        return [planes, (torch.randn(N, 2**bits, device=w.device) * 0.02).sort(dim=1).values.half()]
    def run(x, planes, lut):  # what AnyPrecLinear runs: the GEMV up to 8 tokens, else dequantize and matmul
        if x.shape[0] <= anyprec.GEMV_MAX_TOKENS:
            return torch.ops.anyprec.gemv(x, planes, lut, bits)
        return torch.matmul(x, torch.ops.anyprec.dequant(planes, lut, bits, x.dtype).t())
    return f"anyprec {bits}-bit", make, run


def int4pack(w, groupsize: int) -> list:
    """PyTorch's own int4 format (tinygemm) of the same codes, scales and zeros: w = (q - 8) * scale + zero too."""
    from quantize import quantize_int4, unpack_int4
    weight, scales_and_zeros = quantize_int4(w, groupsize)
    codes = unpack_int4(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).contiguous(), 8)
    return [packed, scales_and_zeros.transpose(0, 1).contiguous()]  # [K/g, N, 2]


def kernels_report(args) -> str:
    """Every kernel against bf16 torch.matmul and torch.ops.aten._weight_int4pack_mm on each layer shape of
    --model_name, at --batch_size tokens: time per call, weight GB/s, and how many times faster than each baseline."""
    device, M, g = args.device, args.batch_size, args.groupsize
    c = ModelArgs.from_name(args.model_name)
    shapes = {"wqkv": ((c.n_head + 2 * c.n_kv_heads) * c.head_dim, c.dim), "wo": (c.dim, c.n_head * c.head_dim),
              "w1, w3": (c.intermediate_size, c.dim), "w2": (c.dim, c.intermediate_size)}
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    baselines = [("bf16 matmul", lambda w: [w], lambda x, w: torch.matmul(x, w.t())),
                 (f"int4pack_mm g{g}", lambda w: int4pack(w, g),
                  lambda x, packed, sz: torch.ops.aten._weight_int4pack_mm(x, packed, g, sz))]
    lines = [header(device), f"{args.model_name} layers, {M} token(s): time per call (CUDA-graph replay over weight "
             f"copies larger than L2, median of 20), weight bytes read per second, speed-up over each baseline",
             f"{'layer':>7} {'N x K':>13}  {'kernel':>18}  {'us':>7}  {'GB/s':>7}  {'vs bf16':>7}  {'vs int4pack':>11}"]
    for layer, (N, K) in shapes.items():
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        timings = {}  # name: (seconds per call, weight bytes)
        for name, make, run in baselines + kernel_candidates(g):
            tensors = make(w)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            copies = [tensors] + [[t.clone() for t in tensors] for _ in range(4 * l2 // nbytes)]
            timings[name] = time_per_call(lambda *t: run(x, *t), copies), nbytes
            del copies
        (bf16, _), (int4pack_mm, _) = timings[baselines[0][0]], timings[baselines[1][0]]
        for name, (seconds, nbytes) in timings.items():
            lines.append(f"{layer:>7} {f'{N} x {K}':>13}  {name:>18}  {seconds * 1e6:>7.1f}  {nbytes / seconds / 1e9:>7.0f}  "
                         f"{bf16 / seconds:>6.2f}x  {int4pack_mm / seconds:>10.2f}x")
    return "\n".join(lines)


def tp_report(args, argv: list) -> str:
    """tok/s at 1, 2, 4 and 8 ranks, as many as there are GPUs here: each a torchrun job of this script with the same
    arguments, one after the other; the speed-up is against the 1-rank job of the same run."""
    gpus = torch.cuda.device_count() if torch.device(args.device).type == "cuda" else os.cpu_count()
    what = args.checkpoint_path or args.model_name
    lines = [header(args.device), f"{what} ({args.dtype}, batch {args.batch_size}, "
             f"{'compiled' if args.compile else 'eager'}, {args.max_new_tokens} new tokens), tensor parallel",
             f"{'ranks':>5}  {'tok/s':>8}  {'speed-up':>8}  {'GB/s per rank':>13}  {'peak GB per rank':>16}"]
    one = None
    for n in [n for n in (1, 2, 4, 8) if n <= gpus]:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            job = subprocess.run([*torchrun, __file__, *[a for a in argv if a != "--tp"], "--json", str(result)],
                                 capture_output=True, text=True)
            if job.returncode != 0:
                errors = [line for line in job.stderr.splitlines() if line.startswith("error:")]
                lines.append(f"{n:>5}  {errors[0] if errors else 'failed: ' + job.stderr.strip()[-300:]}")
                continue
            r = json.loads(result.read_text())
        one = one or (r["tok_s"] if n == 1 else None)
        speed_up = f"{r['tok_s'] / one:.2f}x" if one else "-"
        lines.append(f"{n:>5}  {r['tok_s']:>8.1f}  {speed_up:>8}  {r['weight_gb_s']:>13.1f}  {r['memory_gb']:>16.2f}")
    if gpus < 8:
        lines.append(f"({gpus} {'GPUs' if torch.device(args.device).type == 'cuda' else 'CPU cores'} here: more ranks "
                     f"need a machine with more)")
    return "\n".join(lines)


def header(device) -> str:
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    return f"device {name} | torch {torch.__version__} | {datetime.date.today().isoformat()}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="Llama-2-7b-chat-hf", help="a name from model.py's registry")
    p.add_argument("--checkpoint_path", type=Path, default=None, help="real weights instead of random ones")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--speculative", action="store_true", help="plain vs speculative decoding for each draft: "
                   "--draft_checkpoint_path, an int4 copy of the target, any-precision self-speculation")
    p.add_argument("--draft_checkpoint_path", type=Path, default=None)
    p.add_argument("--speculate_k", type=int, default=5)
    p.add_argument("--draft_precision", type=int, default=3, help="for --speculative: the any-precision pair's draft")
    p.add_argument("--temperature", type=float, default=0.0, help="for --speculative and --medusa; 0 is greedy")
    p.add_argument("--medusa", action="store_true", help="plain vs Medusa decoding")
    p.add_argument("--mode", nargs="+", default=["bf16"], choices=["bf16", "int8", "int4", "int4-gptq", "anyprec"],
                   help="quantized in memory (quantize.py's formats; anyprec: random any-precision weights), each "
                   "decoded against the unquantized model")
    p.add_argument("--precision", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8],
                   help="for --mode anyprec: the widths decoded, one compiled graph each")
    p.add_argument("--groupsize", type=int, default=128, help="for int4 --mode and --kernels")
    p.add_argument("--kernels", action="store_true", help="kernel micro-benchmark on --model_name's layer shapes, "
                   "batch --batch_size, against bf16 torch.matmul and torch.ops.aten._weight_int4pack_mm")
    p.add_argument("--medusa_heads", type=Path, default=None,
                   help="for --medusa (default: medusa_heads.safetensors beside --checkpoint_path)")
    p.add_argument("--tp", action="store_true", help="tensor parallel: decode speed at 1, 2, 4, 8 ranks (torchrun), "
                   "as many as there are GPUs")
    p.add_argument("--json", type=Path, default=None, help="also write the decode figures to this file, as JSON")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.tp:
        return print(tp_report(args, argv))
    rank = maybe_init_dist(args.device)  # under torchrun (--tp): this rank's shard of every layer
    if rank:
        sys.stdout = open(os.devnull, "w")  # output on rank 0 only
    torch.manual_seed(0)  # every rank alike: the same prompts, and the same tokens sampled
    if args.kernels:
        return print(kernels_report(args))
    if args.checkpoint_path is not None:
        model = load_model(args.checkpoint_path, args.device, dtype, tp=rank is not None)
        what = str(args.checkpoint_path)
    else:
        config = ModelArgs.from_name(args.model_name)
        model, what = random_model(config, args.device, dtype, tp=rank is not None), args.model_name
    if args.speculative:
        return print(speculative_report(args, model, what, dtype))
    if args.mode != ["bf16"]:
        return print(quantized_report(args, model, what))
    if args.medusa:
        return print(medusa_report(args, model, what))
    copy = copy_bandwidth(args.device)
    r = decode_speed(model, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, compile=args.compile,
                     runs=args.runs)
    print(header(args.device))
    rows = [
        ("model", f"{what} ({args.dtype}, {weight_bytes(model) / 1e9:.2f} GB of weights, batch {args.batch_size}, "
                  f"{'compiled' if args.compile else 'eager'})"),
        ("decode", f"{r['tok_s']:.1f} tok/s"),
        ("weights read", f"{r['weight_gb_s']:.1f} GB/s"),
        ("copy bandwidth", f"{copy / 1e9:.1f} GB/s (read + written)"),
        ("fraction of copy", f"{r['weight_gb_s'] * 1e9 / copy:.1%}"),
        ("time to first token", f"{r['ttft_ms']:.1f} ms"),
    ]
    print("\n".join(f"{name:>20}: {value}" for name, value in rows))
    if args.json is not None:
        memory = peak_memory_gb(args.device) if rank is None else max_over_ranks(peak_memory_gb(args.device))
        if not rank:
            args.json.write_text(json.dumps(dict(r, memory_gb=memory)))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
