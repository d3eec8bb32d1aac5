"""gpt-fast's own generation, timed on request: the gpt-fast side of `scripts/bench.py cpu`, which starts it.

    python scripts/gpt_fast_worker.py GPT_FAST_DIR WEIGHTS_DIR FORMAT [--compile] [--groupsize G] [--max_new_tokens N]

It runs in a process of its own because gpt-fast's modules are named model, generate and quantize, as ours are:
GPT_FAST_DIR comes first on sys.path, and this repository is not on it. WEIGHTS_DIR holds model.pth (a state dict in
gpt-fast's key names) and model_args.json (the fields of gpt-fast's ModelArgs). FORMAT is float32, bfloat16, int8 or
int4, quantized in memory by gpt-fast's own handlers from the bf16 weights, as its quantize.py does.

Protocol, one JSON line each on stdout: once set up (and warmed up, which compiles), {"ready": true} or, when gpt-fast
cannot run FORMAT here, {"unsupported": "why"}; then for each line "go" on stdin, {"tok_s": decode tokens per second
of one greedy generation}. "quit" or the end of stdin ends it. Everything gpt-fast prints goes to stderr.
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

PROMPT_LEN = 16


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gpt_fast", type=Path, help="a checkout of pytorch-labs/gpt-fast")
    p.add_argument("weights", type=Path, help="the folder with model.pth and model_args.json")
    p.add_argument("format", choices=["float32", "bfloat16", "int8", "int4"])
    p.add_argument("--compile", action="store_true", help="decode_one_token compiled, as gpt-fast's --compile does")
    p.add_argument("--groupsize", type=int, default=128, help="of int4")
    p.add_argument("--max_new_tokens", type=int, default=32)
    return p.parse_args()


def load(weights: Path, fmt: str, groupsize: int):
    """gpt-fast's Transformer with the weights in fmt, built as its quantize.py and generate.py's _load_model do."""
    import quantize
    from model import ModelArgs, Transformer
    with torch.device("meta"):
        model = Transformer(ModelArgs(**json.loads((weights / "model_args.json").read_text())))
    model.load_state_dict(torch.load(weights / "model.pth", weights_only=True), assign=True)
    model = model.to(torch.float32 if fmt == "float32" else torch.bfloat16)
    if fmt == "int8":
        handler = quantize.WeightOnlyInt8QuantHandler(model)
        state = handler.create_quantized_state_dict()
        model = handler.convert_for_runtime()
        model.load_state_dict(state, assign=True)
    elif fmt == "int4":
        handler = quantize.WeightOnlyInt4QuantHandler(model, groupsize)
        state = handler.create_quantized_state_dict()
        model = handler.convert_for_runtime(use_cuda=False)
        model.load_state_dict(state, assign=True)
    return model.eval()


def decode_tok_s(generate, model, prompt, max_new_tokens: int) -> float:
    """Decode tok/s of one greedy generation by gpt-fast's generate(): its callback sees each decoded token as its
    step ends, so the steps after the first, over the time between the first and the last, leave out the prefill."""
    stamps = []
    generate.generate(model, prompt, max_new_tokens, interactive=False, draft_model=None, temperature=0.0,
                      callback=lambda _: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main():
    args = parse_args()
    sys.path[0] = str(args.gpt_fast.resolve())  # in place of this script's folder
    reply = sys.stdout
    with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        import generate
        torch.manual_seed(0)
        try:
            model = load(args.weights, args.format, args.groupsize)
            if args.compile:  # what gpt-fast's main does with --compile, on any device
                generate.decode_one_token = torch.compile(generate.decode_one_token, mode="reduce-overhead",
                                                          fullgraph=True)
            prompt = torch.randint(0, model.config.vocab_size, (PROMPT_LEN,), dtype=torch.int)
            decode_tok_s(generate, model, prompt, args.max_new_tokens)  # warm-up: compiles
        except (RuntimeError, NotImplementedError, AssertionError) as e:
            why = str(e).splitlines()[0].split(". ")[0]  # torch's dispatcher errors run on for a page
            print(json.dumps({"unsupported": f"{type(e).__name__}: {why}"}), file=reply, flush=True)
            return
        print(json.dumps({"ready": True}), file=reply, flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            tok_s = decode_tok_s(generate, model, prompt, args.max_new_tokens)
            print(json.dumps({"tok_s": tok_s}), file=reply, flush=True)


if __name__ == "__main__":
    main()
