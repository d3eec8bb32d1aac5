"""Decode speed on random weights of any registry shape (nothing to download), against the device's own copy
bandwidth, measured in the same run.

    python scripts/bench.py --model_name Llama-2-7b-chat-hf --compile          # batch 1, 200 new tokens
    python scripts/bench.py --checkpoint_path checkpoints/tiny-py/model.pth    # real weights, any device

Decode at batch 1 reads every weight once per token, so weight bytes x tokens/s is the bandwidth it achieves; the
fraction of the measured copy bandwidth (bytes read + written per second) is how close to the hardware it runs.
"""
import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from generate import compile_fns, default_device, generate, load_model, sync, weight_bytes  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402


def random_model(config: ModelArgs, device, dtype) -> Transformer:
    """Weights drawn on the device itself: a 7B model in seconds, never whole on the host."""
    with torch.device("meta"):
        model = Transformer(config)
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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.checkpoint_path is not None:
        model, what = load_model(args.checkpoint_path, args.device, dtype), str(args.checkpoint_path)
    else:
        model, what = random_model(ModelArgs.from_name(args.model_name), args.device, dtype), args.model_name
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


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
