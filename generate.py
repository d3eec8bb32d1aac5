"""Text generation: load a checkpoint, prefill the prompt, decode token by token, stream, chat, batch, benchmark.

    python generate.py --prompt "def fibonacci(n):"                       # the shipped tiny model, on CPU
    python generate.py --checkpoint_path checkpoints/meta-llama/Llama-2-7b-chat-hf/model.pth --compile --interactive
    torchrun --standalone --nproc_per_node=8 generate.py --compile --checkpoint_path DIR/model.pth   # tensor parallel

Decode runs on static shapes (the KV cache is allocated once, positions are tensors), so `--compile` captures one
CUDA graph for the decode step and never recompiles.
"""
import argparse
import contextlib
import functools
import itertools
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from model import KVCache, ModelArgs, Transformer
from tokenizer import load_tokenizer
from tp import input_from_rank0, max_over_ranks, maybe_init_dist, seed_all_ranks, shard_state_dict

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints/tiny-py/model.pth"


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Loading: the checkpoint on disk is the single source of truth, quantization included.

def load_model(checkpoint_path, device="cpu", dtype=torch.bfloat16, tp=False, precisions=None) -> Transformer:
    """Build the model described by config.json (or the registry) and load the weights, memory-mapped.

    A quantized checkpoint names its format under the key "quantization"; its runtime modules replace nn.Linear
    before the weights are loaded, so no flag is needed. tp=True (under torchrun, after tp.maybe_init_dist) loads
    only this rank's shard of every layer. precisions (an any-precision file) loads only the bitplanes and tables
    those widths read.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found: run scripts/prepare.sh <hf_repo_id> for a Hugging Face model "
            f"(e.g. scripts/prepare.sh meta-llama/Llama-2-7b-chat-hf), or scripts/train_tiny.py for the tiny model")
    config = ModelArgs.for_checkpoint(path)
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    quantization = state.pop("quantization", None)
    if precisions is not None:
        from anyprec import select_precisions
        state, quantization = select_precisions(state, quantization, precisions, path)
    with torch.device("meta"):
        model = Transformer(config)
    if quantization is not None:
        apply_quantization(model, quantization)
    check_state_dict(model, state, path)
    if tp:
        state = shard_state_dict(model, state)  # views of this rank's slices: the copy below reads only those
    parameters = {name for name, _ in model.named_parameters()}
    # Tensor by tensor from the memory map to the device: peak memory stays about one model.
    state = {k: v.to(device, dtype if k in parameters else None) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=False)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def apply_quantization(model: nn.Module, quantization: dict):
    mode = quantization.get("mode")
    if mode == "anyprec":
        from anyprec import swap_linears
    elif mode in ("int8", "int4", "int4-gptq"):
        from quantize import swap_linears
    else:
        raise ValueError(f"unknown quantization mode {mode!r} in checkpoint")
    swap_linears(model, quantization)


def check_state_dict(model: nn.Module, state: dict, path):
    """The tensors must be exactly those the config describes: a clear error beats a silent mismatch."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("output.weight")
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {sorted(missing)[:3]}")
    if unexpected:
        problems.append(f"unexpected {sorted(unexpected)[:3]}")
    if wrong:
        k = sorted(wrong)[0]
        problems.append(f"{len(wrong)} shape mismatches, e.g. {k} is {tuple(state[k].shape)}, "
                        f"config expects {tuple(expected[k])}")
    if problems:
        raise ValueError(f"{path} does not match its config ({'; '.join(problems)}): "
                         f"check config.json or re-run scripts/convert_hf_checkpoint.py")


def weight_bytes(model: nn.Module) -> int:
    """Bytes one decode step reads: every weight except the embedding table (a lookup reads one row)."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, (nn.Embedding, KVCache)):
            continue
        if hasattr(module, "bytes_read"):  # an any-precision Linear reads only its current width's planes and table
            total += module.bytes_read()
            continue
        for name, t in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            if name != "rope" and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------------------------
# Sampling. Shared with speculative.py and medusa.py, which need the same warped fp32 distribution.

def logits_to_probs(logits, temperature: float = 1.0, top_k=None, top_p=None):
    """Softmax in fp32 of logits / temperature, restricted to the top_k tokens and the top_p nucleus."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits.softmax(dim=-1)


def sample_from(probs):
    """One draw per row by the exponential race, argmax(p / E): no host sync, so it lives in a CUDA graph."""
    noise = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / noise, dim=-1)


def sample(logits, temperature: float = 0.0, top_k=None, top_p=None):
    """Next tokens [...] from logits [..., vocab]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample_from(logits_to_probs(logits, temperature, top_k, top_p))


# ---------------------------------------------------------------------------------------------------------------
# Prefill and decode: the two functions that get compiled.

def prefill(model: Transformer, tokens, input_pos, last, temperature: float, top_k, top_p):
    """tokens, input_pos [B, S] (rows right-padded); last [B] index of each row's last prompt token.

    Only the last position of each row goes through the output head.
    """
    hidden = model.hidden(tokens, input_pos)
    hidden = hidden[torch.arange(tokens.shape[0], device=tokens.device), last]  # [B, dim]
    return sample(model.output(hidden), temperature, top_k, top_p)


def decode_one_token(model: Transformer, cur, input_pos, temperature: float, top_k, top_p):
    """cur, input_pos [B, 1] -> next tokens [B]."""
    return sample(model(cur, input_pos)[:, -1], temperature, top_k, top_p)


def compile_fns(compile_decode: bool, compile_prefill: bool):
    """(prefill, decode), compiled as asked: decode to one CUDA graph, prefill with dynamic shapes."""
    if compile_decode or compile_prefill:
        import torch._inductor.config
        torch._inductor.config.coordinate_descent_tuning = True
        torch._inductor.config.fx_graph_cache = True
    decode = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True) if compile_decode else None
    return (torch.compile(prefill, dynamic=True, fullgraph=True) if compile_prefill else prefill,
            decode or decode_one_token)


def right_padded(prompts: list[list[int]], device) -> tuple[Tensor, Tensor]:
    """(tokens, input_pos) [B, S]: each prompt from position 0, padded on the right. A row's padding lands in its
    cache past its prompt, where the row's own tokens overwrite it before anything attends there."""
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("empty prompt")
    tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, torch.arange(max(lengths), device=device).expand(len(prompts), -1)


def reserve_cache(model: Transformer, batch_size: int, prompt_length: int, extra: int, what: str, fix: str,
                  name: str = "model"):
    """Grow the model's caches (never shrink them) to batch_size rows of prompt_length + extra slots; `what` names
    the extra slots and `fix` the flag to lower, for the error when they exceed the model's context."""
    length = prompt_length + extra
    if model.max_seq_length >= length and model.max_batch_size >= batch_size:
        return
    if length > model.config.block_size:
        raise ValueError(f"prompt ({prompt_length} tokens) + {what} exceeds the {name}'s context of "
                         f"{model.config.block_size}: shorten the prompt or {fix}")
    model.setup_caches(max(batch_size, model.max_batch_size), max(length, model.max_seq_length))


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature=0.0, top_k=None,
             top_p=None, stop_ids=(), prefill_fn=prefill, decode_fn=decode_one_token, on_tokens=None):
    """Generate up to max_new_tokens after each prompt, all rows in one batch; rows may differ in length.

    Each row decodes at its own positions, so its output equals generating it alone. A row ends at a stop id
    (not included). on_tokens(step, tokens[B] list) is called as tokens arrive, for streaming.
    Returns (new token lists per row, stats dict).
    """
    device = model.tok_embeddings.weight.device
    B, lengths = len(prompts), [len(p) for p in prompts]
    tokens, input_pos = right_padded(prompts, device)
    reserve_cache(model, B, max(lengths), max_new_tokens, f"max_new_tokens ({max_new_tokens})", "--max_new_tokens")
    length = torch.tensor(lengths, device=device)

    sync(device)
    t0 = time.perf_counter()
    cur = prefill_fn(model, tokens, input_pos, length - 1, temperature, top_k, top_p).clone()
    host = cur.tolist()
    ttft = time.perf_counter() - t0
    out, done = [[t] for t in host], [t in stop_ids for t in host]
    if on_tokens:
        on_tokens(0, host)
    pos = length[:, None].clone()  # [B, 1]: where each row's next token goes
    t1 = time.perf_counter()
    steps = 0
    for step in range(1, max_new_tokens):
        if all(done):
            break
        # Clone: a CUDA-graph replay overwrites its output. tolist() is the one host sync of the step.
        cur = decode_fn(model, cur[:, None], pos, temperature, top_k, top_p).clone()
        pos = pos + 1
        host = cur.tolist()
        steps += 1
        for i in range(B):
            if not done[i]:
                out[i].append(host[i])
                done[i] = host[i] in stop_ids
        if on_tokens:
            on_tokens(step, host)
    sync(device)
    decode_time = time.perf_counter() - t1
    results = [row[:-1] if row[-1] in stop_ids else row for row in out]
    stats = dict(ttft=ttft, decode_steps=steps, decode_time=decode_time, batch_size=B,
                 new_tokens=sum(map(len, results)))
    return results, stats


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def summary(all_stats: list[dict], model: nn.Module, device) -> str:
    """One aligned block of the figures a user compares."""
    steps = sum(s["decode_steps"] for s in all_stats)
    seconds = sum(s["decode_time"] for s in all_stats)
    batch = all_stats[0]["batch_size"]
    steps_per_s = steps / seconds if seconds > 0 else float("nan")
    tokens = sum(s.get("decode_tokens", s["decode_steps"] * batch) for s in all_stats)  # speculative: several a step
    tok_s = tokens / seconds if seconds > 0 else float("nan")
    memory, each = peak_memory_gb(device), ""
    if torch.distributed.is_initialized():  # tensor parallel: the weights of one rank, the memory of the fullest
        memory, each = max_over_ranks(memory), f" per {'GPU' if torch.device(device).type == 'cuda' else 'rank'}"
    rows = [
        ("time to first token", f"{1000 * sum(s['ttft'] for s in all_stats) / len(all_stats):.1f} ms"),
        ("decode", f"{tok_s:.2f} tok/s" + (f" ({tok_s / batch:.2f} per sequence)" if batch > 1 else "")),
        ("weights read", f"{weight_bytes(model) * steps_per_s / 1e9:.2f} GB/s{each} "
                         f"({weight_bytes(model) / 1e9:.3f} GB)"),
        ("peak memory", f"{memory:.2f} GB{each}"),
    ]
    if "accepted" in all_stats[0]:  # speculative: accepted[n] counts the row-steps that kept n drafted tokens
        from speculative import acceptance_summary
        mean, histogram = acceptance_summary([sum(c) for c in zip(*(s["accepted"] for s in all_stats))])
        rows += [("tokens per forward", f"{mean:.2f} (mean accepted drafts + 1, per target forward)"),
                 ("drafts accepted", histogram)]
    return "\n".join(f"{name:>20}: {value}" for name, value in rows)


# ---------------------------------------------------------------------------------------------------------------
# Command line.

class TextStream:
    """Prints one row's tokens as they come. A token's text depends on its neighbours (sentencepiece's leading
    spaces, multi-byte characters split across tokens), so each new piece is decoded together with the one
    before it and only the difference is printed."""

    def __init__(self, tokenizer, context: list[int], row: int = 0):
        self.tokenizer, self.row = tokenizer, row
        self.ids = list(context[-4:])  # the end of the prompt: the first reply token's leading space needs it
        self.start, self.read = 0, len(self.ids)
        self.stopped = False

    def __call__(self, step, tokens):
        token = tokens[self.row]
        if self.stopped or token in self.tokenizer.stop_ids:
            self.stopped = True
            return
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.start:self.read])
        after = self.tokenizer.decode(self.ids[self.start:])
        if not after.endswith("\ufffd"):  # else wait for the rest of the character
            print(after[len(before):], end="", flush=True)
            self.start, self.read = self.read, len(self.ids)


def read_prompts(args, tokenizer) -> list[list[int]]:
    texts = [args.prompt] if args.prompt_file is None else [
        line.rstrip("\n").replace("\\n", "\n") for line in open(args.prompt_file) if line.strip()]
    return [tokenizer.encode(t, bos=True) for t in texts for _ in range(args.batch_size)]


def chat(model, tokenizer, args, prefill_fn, decode_fn, generate_fn=generate):
    """A chat loop with the model's template and the conversation's history. /reset forgets it, /exit ends."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat: /reset forgets the conversation, /exit (or Ctrl-D) ends it, /precision N switches the width of an "
          "any-precision model.")
    while True:
        try:
            text = (input_from_rank0 if torch.distributed.is_initialized() else input)("\nuser> ")
        except EOFError:
            return
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if text.strip().startswith("/precision"):  # an any-precision model switches width between turns
            from anyprec import set_precision
            try:
                set_precision(model, int(text.split()[1]))
                print(f"[now at {text.split()[1]} bits]")
            except (ValueError, IndexError) as e:
                print(f"[{e if 'precision' in str(e) else 'usage: /precision N'}]")
            continue
        messages.append({"role": "user", "content": text})
        ids = tokenizer.chat_prompt(messages)
        if len(ids) + args.max_new_tokens > model.max_seq_length:
            print(f"[the conversation ({len(ids)} tokens) no longer fits the cache of {model.max_seq_length}: /reset]")
            messages.pop()
            continue
        stream = TextStream(tokenizer, ids)
        print("assistant> ", end="", flush=True)
        (reply,), _ = generate_fn(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, stop_ids=tokenizer.stop_ids, prefill_fn=prefill_fn,
                               decode_fn=decode_fn, on_tokens=stream)
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
        print()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--prompt_file", type=Path, help="one prompt per line (\\n for newlines), decoded as one batch")
    p.add_argument("--interactive", action="store_true", help="chat with the model's template")
    p.add_argument("--system", default=None, help="system message for --interactive")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=1, help="samples of each prompt decoded together")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--max_seq_length", type=int, default=None, help="KV cache length (default: what the run needs; "
                   "for --interactive the model's context up to 4096)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--compile", action="store_true", help="compile decode into a CUDA graph")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill with dynamic shapes")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", type=int, default=None, help="bits per weight of an any-precision model "
                   "(anyprec.py); default its widest")
    p.add_argument("--draft_checkpoint_path", type=Path, default=None, help="speculative decoding with this draft")
    p.add_argument("--speculate_k", type=int, default=5, help="tokens the draft proposes per target forward")
    p.add_argument("--draft_precision", type=int, default=None, help="self-speculation: an any-precision model "
                   "drafts with its own weights at this many bits")
    p.add_argument("--medusa_heads", type=Path, default=None, help="Medusa decoding with these heads (medusa.py train)")
    p.add_argument("--medusa_tree", default=None, help="mc_sim_7b_63 or a JSON file of medusa_choices "
                   "(default: the tree calibrated with the heads)")
    p.add_argument("--medusa_typical", action="store_true", help="Medusa's typical acceptance instead of exact "
                   "sampling at temperature > 0 (faster, not the model's distribution)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank = maybe_init_dist(args.device)  # under torchrun: tensor parallelism, one shard of every layer per rank
    log = sys.stderr  # progress notes; the text goes to stdout
    if rank is not None:
        seed_all_ranks(args.seed)  # every rank holds the same logits: the same seed draws the same tokens
        if rank > 0:  # output on rank 0 only (errors still reach stderr)
            sys.stdout = log = open(os.devnull, "w")
    elif args.seed is not None:
        torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)
    t0 = time.perf_counter()
    # An any-precision file at one width loads only that width's planes; --interactive keeps all for /precision.
    widths = None if args.precision is None or args.interactive else {args.precision, args.draft_precision} - {None}
    model = load_model(args.checkpoint_path, args.device, dtype, tp=rank is not None, precisions=widths)
    if args.precision is not None:
        from anyprec import set_precision
        set_precision(model, args.precision)
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}: "
                         f"the tokenizer beside {args.checkpoint_path} belongs to another model")
    sync(args.device)
    print(f"loaded {args.checkpoint_path} in {time.perf_counter() - t0:.2f} s", file=log)
    generate_fn, compile_decoding = generate, compile_fns
    if args.medusa_heads:  # the heads propose a tree of continuations, the model verifies it in one forward
        import medusa
        if args.draft_checkpoint_path or args.draft_precision:
            raise ValueError("--medusa_heads and a draft (--draft_checkpoint_path, --draft_precision) are two ways to "
                             "decode: pick one")
        generate_fn = functools.partial(medusa.generate, typical=(0.09, 0.3) if args.medusa_typical else None,
                                        **medusa.load(args.medusa_heads, model, args.medusa_tree))
        compile_decoding = medusa.compile_fns
    if args.draft_checkpoint_path or args.draft_precision:  # the draft proposes, the model verifies in one forward
        import speculative
        draft = speculative.load_draft(model, args.draft_checkpoint_path, args.draft_precision, args.device, dtype)
        generate_fn = functools.partial(speculative.generate, draft=draft, speculate_k=args.speculate_k)
        compile_decoding = speculative.compile_fns
    prefill_fn, decode_fn = compile_decoding(args.compile, args.compile_prefill)
    if args.interactive:
        model.setup_caches(1, args.max_seq_length or min(model.config.block_size, 4096))
        return chat(model, tokenizer, args, prefill_fn, decode_fn, generate_fn)

    prompts = read_prompts(args, tokenizer)
    need = max(map(len, prompts)) + args.max_new_tokens
    limit = args.max_seq_length or model.config.block_size
    if need > limit:
        where = "--max_seq_length" if args.max_seq_length else "the model's context"
        raise ValueError(f"prompt ({max(map(len, prompts))} tokens) + --max_new_tokens ({args.max_new_tokens}) "
                         f"exceeds {where} of {limit}: shorten the prompt or lower --max_new_tokens")
    model.setup_caches(len(prompts), args.max_seq_length or need)
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=tokenizer.stop_ids,
                  prefill_fn=prefill_fn, decode_fn=decode_fn)
    if args.compile or args.compile_prefill:  # the first run compiles; it is not counted
        t = time.perf_counter()
        generate_fn(model, prompts, args.max_new_tokens, **kwargs)
        print(f"compiled in {time.perf_counter() - t:.1f} s", file=log)
    all_stats = []
    for _ in range(args.num_samples):
        stream = TextStream(tokenizer, prompts[0]) if len(prompts) == 1 else None
        if stream:
            print(tokenizer.decode(prompts[0]), end="", flush=True)
        results, stats = generate_fn(model, prompts, args.max_new_tokens, on_tokens=stream, **kwargs)
        if stream:
            print()
        else:
            for i, (prompt, reply) in enumerate(zip(prompts, results)):
                print(f"--- [{i}]\n{tokenizer.decode(prompt + reply)}")
        all_stats.append(stats)
    print(summary(all_stats, model, args.device))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
