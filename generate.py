"""Text generation: load a checkpoint, prefill the prompt, decode token by token, stream, chat, batch, benchmark.

    python generate.py --prompt "def fibonacci(n):"                       # the shipped tiny model, on CPU
    python generate.py --checkpoint_path checkpoints/meta-llama/Llama-2-7b-chat-hf/model.pth --compile --interactive
    torchrun --standalone --nproc_per_node=8 generate.py --compile --checkpoint_path DIR/model.pth   # tensor parallel

Decode runs on static shapes (the KV cache is allocated once, positions are tensors), so `--compile` captures one
CUDA graph for the decode step and never recompiles. `generate` is the one decode loop: plain decoding here,
speculative decoding (speculative.py) and Medusa (medusa.py) are other `Decoder`s that it runs.

Needs model.py, tokenizer.py, quantize.py and anyprec.py (the formats a checkpoint may be in), tp.py (torchrun) and
cli.py (flags and errors).
"""
import argparse
import itertools
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

import anyprec
import cli
import quantize
from model import DEFAULT_CHECKPOINT, KVCache, ModelArgs, Transformer, load_state
from tokenizer import load_tokenizer
from tp import (input_from_rank0, max_over_ranks, maybe_init_dist, seed_all_ranks, shard_state_dict,
                stalls_end_the_job)


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
    state = load_state(path)
    config = ModelArgs.for_checkpoint(path)
    quantization = state.pop("quantization", None)
    if precisions is not None:
        state, quantization = anyprec.select_precisions(state, quantization, precisions, path)
    with torch.device("meta"):
        model = Transformer(config)
    if quantization is not None:  # each format swaps in its own modules
        format_module = anyprec if quantization.get("mode") == "anyprec" else quantize
        format_module.swap_linears(model, quantization)
    check_state_dict(model, state, path)
    if tp:
        state = shard_state_dict(model, state)  # views of this rank's slices: the copy below reads only those
    parameters = {name for name, _ in model.named_parameters()}
    # Tensor by tensor from the memory map to the device: peak memory stays about one model. Contiguous, as the
    # kernels read weights 16 bytes at a time: a row-parallel shard is a strided view until here.
    state = {k: v.to(device, dtype if k in parameters else None).contiguous() for k, v in state.items()}
    check_finite(state, parameters, path)
    model.load_state_dict(state, assign=True, strict=False)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def check_state_dict(model: nn.Module, state: dict, path):
    """The tensors must be exactly those the config describes, weights floating point and a quantized format's
    tensors of its own dtypes: a clear error beats a silent mismatch, or garbage."""
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop("output.weight")
    parameters = {name for name, _ in model.named_parameters()}
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {sorted(missing)[:3]}")
    if unexpected:
        problems.append(f"unexpected {sorted(unexpected)[:3]}")
    if wrong:
        k = sorted(wrong)[0]
        problems.append(f"{len(wrong)} shape mismatches, e.g. {k} is {tuple(state[k].shape)}, "
                        f"config expects {tuple(expected[k].shape)}")
    if problems:
        raise ValueError(f"{path} does not match its config ({'; '.join(problems)}): "
                         f"check config.json or re-run scripts/convert_hf_checkpoint.py")
    for k in sorted(expected):
        ok = state[k].is_floating_point() if k in parameters else state[k].dtype == expected[k].dtype
        if not ok:
            want = "a floating-point type" if k in parameters else expected[k].dtype
            raise ValueError(f"{path} is damaged or of another format: {k} is {state[k].dtype}, expected {want}")


def check_finite(state: dict, parameters: set, path):
    """A quantized format's scales and tables must be finite (they are small; the weights are left unread)."""
    for k, t in state.items():
        if k not in parameters and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{path} is damaged: {k} holds NaN or infinite values")


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
# Decoders: how tokens are produced. The loop below runs any of them.

@dataclass
class Decoder:
    """A decoding strategy: `prefill` the prompts, then `step` until every row is done.

    Both return, per row, the tokens emitted ([B, m]; m = 1 for plain decoding, more for speculative and Medusa),
    how many of them are valid ([B], 1..m), and the state the next step takes (device tensors: a step copies
    nothing from the host).
        prefill(tokens [B, S], input_pos [B, S], last [B]) -> (tokens, n, state)   last: each row's last prompt index
        step(state, active [B] bool) -> (tokens, n, state)   a finished row (not active) computes on, but may write
                                                              only past its sequence and inside its cache
    """
    prefill: Callable
    step: Callable
    models: tuple  # the models whose KV caches the steps write
    lookahead: int = 0  # cache slots a step may write past the last token the loop keeps


def compile_step(fn):
    """fn compiled for decoding: one CUDA graph per input shape (mode reduce-overhead), never a graph break."""
    _inductor_options()
    return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)


def compile_prefill(fn):
    """fn compiled for prompts of any length: dynamic shapes, no CUDA graph."""
    _inductor_options()
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _inductor_options():
    import torch._inductor.config
    torch._inductor.config.coordinate_descent_tuning = True
    torch._inductor.config.fx_graph_cache = True


def prefill(model: Transformer, tokens, input_pos, last, temperature: float, top_k, top_p):
    """tokens, input_pos [B, S] (rows right-padded); last [B] index of each row's last prompt token -> tokens [B].

    Only the last position of each row goes through the output head.
    """
    hidden = model.hidden(tokens, input_pos)
    hidden = hidden[torch.arange(tokens.shape[0], device=tokens.device), last]  # [B, dim]
    return sample(model.output(hidden), temperature, top_k, top_p)


def decode_one_token(model: Transformer, cur, input_pos, temperature: float, top_k, top_p):
    """cur, input_pos [B, 1] -> next tokens [B]."""
    return sample(model(cur, input_pos)[:, -1], temperature, top_k, top_p)


def plain_decoder(model: Transformer, temperature=0.0, top_k=None, top_p=None, compile=False,
                  compile_prefill_too=False) -> Decoder:
    """One token per step. State: (the last token [B], its position [B], ones [B])."""
    prefill_fn = compile_prefill(prefill) if compile_prefill_too else prefill
    decode_fn = compile_step(decode_one_token) if compile else decode_one_token

    def first(tokens, input_pos, last):
        cur = prefill_fn(model, tokens, input_pos, last, temperature, top_k, top_p).clone()
        valid = torch.ones_like(cur)  # every step's count: made once, as each op costs microseconds on a small model
        return cur[:, None], valid, (cur, last + 1, valid)

    def step(state, active):
        cur, pos, valid = state
        cur = decode_fn(model, cur[:, None], pos[:, None], temperature, top_k, top_p)
        if cur.is_cuda:
            cur = cur.clone()  # a CUDA-graph replay overwrites its output
        return cur[:, None], valid, (cur, pos + active, valid)

    return Decoder(first, step, (model,))


# ---------------------------------------------------------------------------------------------------------------
# The decode loop.

def right_padded(prompts: list[list[int]], device) -> tuple[Tensor, Tensor]:
    """(tokens, input_pos) [B, S]: each prompt from position 0, padded on the right. A row's padding lands in its
    cache past its prompt, where the row's own tokens overwrite it before anything attends there."""
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("empty prompt: give at least one token")
    tokens = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, torch.arange(tokens.shape[1], device=device).expand(len(prompts), -1)


def check_context(prompt_length: int, max_new_tokens: int, lookahead: int, capacity: int, what: str):
    """The one check that a generation fits its cache (`what` names the limit: the model's context, a flag)."""
    extra = f" + {lookahead} slots a step may write ahead" if lookahead else ""
    if prompt_length + max_new_tokens + lookahead > capacity:
        raise ValueError(f"prompt ({prompt_length} tokens) + --max_new_tokens ({max_new_tokens}){extra} exceeds "
                         f"{what} of {capacity}: shorten the prompt or lower --max_new_tokens")


def reserve_cache(decoder: Decoder, batch_size: int, prompt_length: int, max_new_tokens: int):
    """Grow the caches of the decoder's models (never shrink them) to fit the generation."""
    length = prompt_length + max_new_tokens + decoder.lookahead
    for model in decoder.models:
        name = "the model's context" if model is decoder.models[0] else "the draft model's context"
        check_context(prompt_length, max_new_tokens, decoder.lookahead, model.config.block_size, name)
        if model.max_seq_length < length or model.max_batch_size < batch_size:
            model.setup_caches(max(batch_size, model.max_batch_size), max(length, model.max_seq_length))


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, decoder: Decoder = None,
             temperature=0.0, top_k=None, top_p=None, stop_ids=(), on_tokens=None):
    """Generate up to max_new_tokens after each prompt, all rows in one batch; rows may differ in length.

    decoder: how (default: plain decoding with temperature, top_k and top_p). Each row decodes at its own positions,
    so its output equals generating it alone. A row ends at a stop id (not included). on_tokens(new) is called
    after the prefill and after every step, new[b] being the tokens row b gained (for streaming).
    Returns (new token lists per row, stats dict).
    """
    decoder = decoder or plain_decoder(model, temperature, top_k, top_p)
    device = model.tok_embeddings.weight.device
    B, lengths = len(prompts), [len(p) for p in prompts]
    tokens, input_pos = right_padded(prompts, device)
    reserve_cache(decoder, B, max(lengths), max_new_tokens)
    out, done = [[] for _ in range(B)], [False] * B

    def take(emitted, n):  # the one host sync of a step
        rows = torch.cat([emitted, n[:, None]], 1).tolist()
        new = keep_tokens(rows, out, done, stop_ids, max_new_tokens)
        if on_tokens:
            on_tokens([row[:-1] if row and row[-1] in stop_ids else row for row in new])
        return rows, new

    sync(device)
    t0 = time.perf_counter()
    emitted, n, state = decoder.prefill(tokens, input_pos, torch.tensor(lengths, device=device) - 1)
    take(emitted, n)
    ttft, t1 = time.perf_counter() - t0, time.perf_counter()
    steps, decode_tokens, accepted, active_rows = 0, 0, [], None
    while not all(done):
        if active_rows != [not d for d in done]:  # a copy to the device syncs too: only when a row ends
            active_rows = [not d for d in done]
            active = torch.tensor(active_rows, device=device)
        emitted, n, state = decoder.step(state, active)
        rows, new = take(emitted, n)
        steps, decode_tokens = steps + 1, decode_tokens + sum(map(len, new))
        accepted += [0] * (len(rows[0]) - 1 - len(accepted))
        for row, running in zip(rows, active_rows):  # accepted[j]: row-steps that emitted j + 1 tokens
            accepted[row[-1] - 1] += running
    sync(device)
    results = [row[:-1] if row and row[-1] in stop_ids else row for row in out]
    stats = dict(ttft=ttft, decode_steps=steps, decode_time=time.perf_counter() - t1, batch_size=B,
                 new_tokens=sum(map(len, results)), decode_tokens=decode_tokens, accepted=accepted)
    return results, stats


def keep_tokens(rows: list, out: list, done: list, stop_ids, max_new_tokens: int) -> list:
    """Append each running row's valid tokens (rows[b]: a step's tokens, then how many are valid) to out[b], up to
    a stop id or max_new_tokens, which end the row. Returns what each row gained."""
    new = [[] for _ in rows]
    for i, row in enumerate(rows):
        for t in row[: row[-1]] if not done[i] else ():
            out[i].append(t)
            new[i].append(t)
            if t in stop_ids or len(out[i]) == max_new_tokens:
                done[i] = True
                break
    return new


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def acceptance_summary(accepted: list[int]) -> tuple[float, str]:
    """(mean tokens a step emits, the histogram 'j: share' of steps that accepted j proposals, j = 0..m-1)."""
    total = sum(accepted)
    mean = sum((j + 1) * c for j, c in enumerate(accepted)) / max(total, 1)
    return mean, "  ".join(f"{j}: {c / max(total, 1):.0%}" for j, c in enumerate(accepted))


def summary(all_stats: list[dict], model: nn.Module, device) -> str:
    """One aligned block of the figures a user compares."""
    steps = sum(s["decode_steps"] for s in all_stats)
    seconds = sum(s["decode_time"] for s in all_stats)
    batch = all_stats[0]["batch_size"]
    steps_per_s = steps / seconds if seconds > 0 else float("nan")
    tok_s = sum(s["decode_tokens"] for s in all_stats) / seconds if seconds > 0 else float("nan")
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
    accepted = [sum(c) for c in itertools.zip_longest(*(s["accepted"] for s in all_stats), fillvalue=0)]
    if len(accepted) > 1:  # speculative or Medusa: a step may emit several tokens
        mean, histogram = acceptance_summary(accepted)
        rows += [("tokens per forward", f"{mean:.2f} (accepted proposals + 1, per forward of the model)"),
                 ("proposals accepted", histogram)]
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

    def __call__(self, new: list[list[int]]):
        for token in new[self.row]:
            self.ids.append(token)
            before = self.tokenizer.decode(self.ids[self.start:self.read])
            after = self.tokenizer.decode(self.ids[self.start:])
            if not after.endswith("\ufffd"):  # else wait for the rest of the character
                print(after[len(before):], end="", flush=True)
                self.start, self.read = self.read, len(self.ids)


def read_prompts(args, tokenizer) -> list[list[int]]:
    """--prompt, or the lines of --prompt_file (\\n for a newline), each --batch_size times."""
    texts = [args.prompt]
    if args.prompt_file is not None:
        try:
            texts = [line.rstrip("\n").replace("\\n", "\n") for line in args.prompt_file.read_text().splitlines()
                     if line.strip()]
        except UnicodeDecodeError:
            raise ValueError(f"--prompt_file {args.prompt_file} is not UTF-8 text") from None
        except OSError as e:
            raise ValueError(f"--prompt_file {args.prompt_file}: {e.strerror}") from None
        if not texts:
            raise ValueError(f"--prompt_file {args.prompt_file} holds no prompt: one prompt per line")
    return [tokenizer.encode(t, bos=True) for t in texts for _ in range(args.batch_size)]


def chat(model, tokenizer, decoder: Decoder, args):
    """A chat loop with the model's template and the conversation's history. /reset forgets it, /exit ends."""
    length = args.max_seq_length or min(model.config.block_size, 4096)
    check_context(1, args.max_new_tokens, decoder.lookahead, length, "the chat's cache (--max_seq_length)")
    for m in decoder.models:
        m.setup_caches(1, min(length, m.config.block_size))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat: /reset forgets the conversation, /exit (or Ctrl-D) ends it, /precision N switches the width of an "
          "any-precision model.")
    while True:
        try:
            text = (input_from_rank0 if torch.distributed.is_initialized() else input)("\nuser> ").strip()
        except EOFError:
            return
        if text == "/exit":
            return
        if text == "/reset":
            messages = messages[:1] if args.system else []
        elif text.startswith("/precision"):  # an any-precision model switches width between turns
            switch_precision(model, text)
        else:
            messages = chat_turn(model, tokenizer, decoder, args, messages + [{"role": "user", "content": text}])


def switch_precision(model, command: str):
    try:
        anyprec.set_precision(model, int(command.split()[1]))
        print(f"[now at {command.split()[1]} bits]")
    except (ValueError, IndexError) as e:
        print(f"[{e if 'precision' in str(e) else 'usage: /precision N'}]")


def chat_turn(model, tokenizer, decoder: Decoder, args, messages: list) -> list:
    """The assistant's reply to the conversation, streamed; returns the conversation with it (or without the last
    message, when the conversation no longer fits the cache)."""
    ids = tokenizer.chat_prompt(messages)
    if len(ids) + args.max_new_tokens + decoder.lookahead > model.max_seq_length:
        print(f"[the conversation ({len(ids)} tokens) no longer fits the cache of {model.max_seq_length}: /reset]")
        return messages[:-1]
    print("assistant> ", end="", flush=True)
    (reply,), _ = generate(model, [ids], args.max_new_tokens, decoder=decoder, stop_ids=tokenizer.stop_ids,
                           on_tokens=TextStream(tokenizer, ids))
    print()
    return messages + [{"role": "assistant", "content": tokenizer.decode(reply)}]


def parse_args(argv=None):
    count = cli.at_least(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--prompt_file", type=Path, help="one prompt per line (\\n for newlines), decoded as one batch")
    p.add_argument("--interactive", action="store_true", help="chat with the model's template")
    p.add_argument("--system", default=None, help="system message for --interactive")
    p.add_argument("--num_samples", type=count, default=1)
    p.add_argument("--batch_size", type=count, default=1, help="samples of each prompt decoded together")
    p.add_argument("--max_new_tokens", type=count, default=200)
    p.add_argument("--max_seq_length", type=count, default=None, help="KV cache length (default: what the run "
                   "needs; for --interactive the model's context up to 4096)")
    p.add_argument("--temperature", type=cli.at_least(0.0, float), default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=count, default=200)
    p.add_argument("--top_p", type=cli.probability, default=None, help="in (0, 1]")
    p.add_argument("--compile", action="store_true", help="compile decode into a CUDA graph")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill with dynamic shapes")
    p.add_argument("--device", type=cli.device, default=default_device())
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", type=int, default=None, help="bits per weight of an any-precision model "
                   "(anyprec.py); default its widest")
    p.add_argument("--draft_checkpoint_path", type=Path, default=None, help="speculative decoding with this draft")
    p.add_argument("--speculate_k", type=count, default=5, help="tokens the draft proposes per target forward")
    p.add_argument("--draft_precision", type=int, default=None, help="self-speculation: an any-precision model "
                   "drafts with its own weights at this many bits")
    p.add_argument("--medusa_heads", type=Path, default=None, help="Medusa decoding with these heads (medusa.py train)")
    p.add_argument("--medusa_tree", default=None, help="mc_sim_7b_63 or a JSON file of medusa_choices "
                   "(default: the tree calibrated with the heads)")
    p.add_argument("--medusa_typical", action="store_true", help="Medusa's typical acceptance instead of exact "
                   "sampling at temperature > 0 (faster, not the model's distribution)")
    p.add_argument("--timeout", type=cli.at_least(1.0, float), default=600, help="under torchrun: seconds a rank "
                   "waits for the others before the job ends with an error (longer than a first compile)")
    args = p.parse_args(argv)
    if args.medusa_heads and (args.draft_checkpoint_path or args.draft_precision):
        p.error("--medusa_heads and a draft (--draft_checkpoint_path, --draft_precision) are two ways to decode: "
                "pick one")
    return args


def dtype_of(args) -> torch.dtype:
    return getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)


def start_ranks(args):
    """Under torchrun, join the job (tensor parallelism: one shard of every layer per rank) and seed every rank alike,
    so that from the same logits they draw the same tokens. Returns (rank or None, where progress notes go)."""
    rank = maybe_init_dist(args.device, args.timeout)
    if rank is None:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        return None, sys.stderr
    seed_all_ranks(args.seed)
    if rank > 0:  # output on rank 0 only (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    return rank, sys.stdout if rank > 0 else sys.stderr


def load_for_generation(args, rank, log):
    """The model (at --precision, sharded under torchrun) and its tokenizer, checked against each other."""
    t0 = time.perf_counter()
    # An any-precision file at one width loads only that width's planes; --interactive keeps all for /precision.
    widths = None if args.precision is None or args.interactive else {args.precision, args.draft_precision} - {None}
    model = load_model(args.checkpoint_path, args.device, dtype_of(args), tp=rank is not None, precisions=widths)
    if args.precision is not None:
        anyprec.set_precision(model, args.precision)
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}: "
                         f"the tokenizer beside {args.checkpoint_path} belongs to another model")
    sync(args.device)
    print(f"loaded {args.checkpoint_path} in {time.perf_counter() - t0:.2f} s", file=log)
    return model, tokenizer


def run_prompts(model, tokenizer, decoder: Decoder, args, log):
    """Generate for the prompts --num_samples times (after a first, uncounted run when compiling), print, sum up."""
    prompts = read_prompts(args, tokenizer)
    if args.max_seq_length:  # a cache of the size asked for, so that compiled graphs serve later runs too
        check_context(max(map(len, prompts)), args.max_new_tokens, decoder.lookahead, args.max_seq_length,
                      "--max_seq_length")
        for m in decoder.models:
            m.setup_caches(len(prompts), args.max_seq_length)
    kwargs = dict(decoder=decoder, stop_ids=tokenizer.stop_ids)
    if args.compile or args.compile_prefill:
        t = time.perf_counter()
        generate(model, prompts, args.max_new_tokens, **kwargs)
        print(f"compiled in {time.perf_counter() - t:.1f} s", file=log)
    all_stats = []
    for _ in range(args.num_samples):
        stream = TextStream(tokenizer, prompts[0]) if len(prompts) == 1 else None
        if stream:
            print(tokenizer.decode(prompts[0]), end="", flush=True)
        results, stats = generate(model, prompts, args.max_new_tokens, on_tokens=stream, **kwargs)
        print() if stream else print("".join(f"--- [{i}]\n{tokenizer.decode(p + r)}\n"
                                             for i, (p, r) in enumerate(zip(prompts, results))), end="")
        all_stats.append(stats)
    print(summary(all_stats, model, args.device))


def main(argv=None):
    args = parse_args(argv)
    rank, log = start_ranks(args)
    with stalls_end_the_job(args.timeout):
        model, tokenizer = load_for_generation(args, rank, log)
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, compile=args.compile,
                        compile_prefill_too=args.compile_prefill)
        if args.medusa_heads:  # the heads propose a tree of continuations, the model verifies it in one forward
            import medusa
            heads, tree = medusa.load(args.medusa_heads, model, args.medusa_tree)
            decoder = medusa.decoder(model, heads, tree, typical=args.medusa_typical, **sampling)
        elif args.draft_checkpoint_path or args.draft_precision:  # a draft proposes, the model verifies them at once
            import speculative
            draft = speculative.load_draft(model, args.draft_checkpoint_path, args.draft_precision, args.device,
                                           dtype_of(args))
            decoder = speculative.decoder(model, draft, args.speculate_k, **sampling)
        else:
            decoder = plain_decoder(model, **sampling)
        if args.interactive:
            return chat(model, tokenizer, decoder, args)
        run_prompts(model, tokenizer, decoder, args, log)


if __name__ == "__main__":
    cli.run(main)
