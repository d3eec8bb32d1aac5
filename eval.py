"""Perplexity and task accuracy of any checkpoint the project loads.

Perplexity: over the held-out split of the Python standard library's source (the tiny model's corpus) or a text
file, in non-overlapping windows. Task accuracy (hellaswag, arc, winogrande, mmlu, ...): through EleutherAI's
lm-evaluation-harness, an optional dependency that only --tasks imports.

    python eval.py                                    # the shipped tiny model on its held-out split
    python eval.py --checkpoint_path DIR/model_int4.g128.pth --seq_len 512
    python eval.py --text_file notes.txt
    python eval.py --checkpoint_path DIR/model_int4.g128.pth --tasks hellaswag,arc_easy --limit 200
    python eval.py --tasks pycode_mc,pycode_gen --include_path tests/tasks    # our own small tasks, offline

Needs model.py, tokenizer.py, cli.py and generate.py (loading, the decode loop), tp.py under torchrun.
"""
import argparse
import hashlib
import itertools
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
from generate import DEFAULT_CHECKPOINT, default_device, dtype_of, generate, load_model
from model import atomic_write
from tokenizer import load_tokenizer
from tp import maybe_init_dist

HELDOUT_PERCENT = 5


def stdlib_split(relative_path: str) -> str:
    """'heldout' for about 5% of files, chosen by a hash of the path relative to the stdlib: stable everywhere."""
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def stdlib_texts(split: str) -> list[str]:
    """The text of every .py file of this Python's standard library in `split` ('train' or 'heldout'), sorted by
    path. site-packages is left out: it differs between machines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in relative.split("/") or stdlib_split(relative) != split:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            texts.append(text)
    return texts


def encode_documents(tokenizer, texts) -> torch.Tensor:
    """One token stream: every document starts with BOS, as in training."""
    if isinstance(texts, str):
        texts = [texts]
    return torch.tensor([t for text in texts for t in tokenizer.encode(text, bos=True)], dtype=torch.long)


def calibration_windows(tokenizer, samples: int = 128, seq_len: int = 512, text_file=None, seed: int = 0,
                        split: str = "train"):
    """[samples, seq_len] token windows at random offsets of the stdlib's `split` (or of text_file), for GPTQ,
    any-precision and Medusa calibration.

    Quantizers take the train split, not the held-out one, because perplexity is measured on the held-out split and
    a quantizer must not have seen it (the GPTQ paper calibrates on C4 train and evaluates elsewhere too).
    """
    if text_file is not None and not Path(text_file).is_file():
        raise FileNotFoundError(f"--calibration_file {text_file} not found")
    texts = stdlib_texts(split) if text_file is None else [Path(text_file).read_text()]
    stream = encode_documents(tokenizer, texts)
    if len(stream) <= seq_len:
        raise ValueError(f"calibration text has {len(stream)} tokens, fewer than --calibration_seq_len {seq_len}")
    starts = torch.randint(0, len(stream) - seq_len, (samples,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, tokenizer, text, seq_len: int, batch_size: int = 8, max_tokens=None) -> dict:
    """Mean next-token NLL over `text` (a string or a list of documents) cut into windows of seq_len tokens; each
    window is scored from its own start, so every token but the first is predicted exactly once.

    The model runs without a KV cache. Returns tokens, nll, perplexity.
    """
    if model.has_cache:
        raise ValueError("perplexity runs the model without a KV cache: load a fresh model")
    stream = encode_documents(tokenizer, text)
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    device = next(model.parameters()).device
    nll, count = 0.0, 0

    def score(windows):  # [n, <= seq_len + 1]
        nonlocal nll, count
        windows = windows.to(device)
        logits = model(windows[:, :-1])
        nll += F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten(), reduction="sum").item()
        count += windows[:, 1:].numel()

    full = (len(stream) - 1) // seq_len
    for first in range(0, full, batch_size):
        last = min(first + batch_size, full)
        score(torch.stack([stream[w * seq_len: (w + 1) * seq_len + 1] for w in range(first, last)]))
    if len(stream) - full * seq_len > 1:  # the short last window
        score(stream[full * seq_len:][None])
    mean = nll / count
    return dict(tokens=count, nll=mean, perplexity=math.exp(mean))


# ---------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness. The harness asks a model three questions: the log-likelihood of a continuation after a
# context (multiple choice: hellaswag, arc, winogrande, mmlu), the log-likelihood of a whole document (perplexity
# tasks such as wikitext) and a generation up to stop strings (gsm8k and the like). The functions below answer them
# on token lists and strings and need no harness; harness_model_class wraps them in the harness's model class.

@torch.no_grad()
def continuation_logprobs(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8,
                          progress: bool = False) -> list[tuple[float, bool]]:
    """For each (context, continuation) token lists: (log p(continuation | context), whether greedy decoding would
    produce the continuation).

    A row is context + continuation without its last token, cut from the left to the model's context as the harness
    expects. Rows are sorted longest first, so that a batch holds similar lengths and little padding.
    """
    if model.has_cache:
        raise ValueError("scoring runs the model without a KV cache: load a fresh model")
    block = model.config.block_size
    rows = []
    for context, continuation in requests:
        if len(continuation) > block:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds the model's context of {block}")
        rows.append(((context + continuation)[-(block + 1):-1], continuation))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results = [None] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), desc="loglikelihood", disable=not progress):
        batch = order[start: start + batch_size]
        for i, result in zip(batch, score_rows(model, [rows[i] for i in batch])):
            results[i] = result
    return results


def score_rows(model, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """rows: (inputs, continuation), the continuation being predicted at the last len(continuation) inputs.

    Each row sits at positions 0.. and is padded on the right: attention is causal, so padding only ever follows a
    row's own tokens and no scored position sees it. Only the scored positions go through the output head (with
    Llama 3's 128k-token vocabulary, a head over every position would be most of the work).
    """
    device = model.tok_embeddings.weight.device
    width = max(len(inputs) for inputs, _ in rows)
    tokens = torch.tensor([inputs + [0] * (width - len(inputs)) for inputs, _ in rows], device=device)  # [B, S]
    hidden = model.hidden(tokens)  # [B, S, dim]
    row = torch.tensor([b for b, (_, cont) in enumerate(rows) for _ in cont], device=device)
    col = torch.tensor([len(inputs) - len(cont) + j for inputs, cont in rows for j in range(len(cont))], device=device)
    target = torch.tensor([t for _, cont in rows for t in cont], device=device)  # [N]: every row's continuation
    logprobs = model.output(hidden[row, col]).float().log_softmax(dim=-1)  # [N, vocab]
    scores = logprobs.gather(-1, target[:, None])[:, 0].cpu()
    greedy = (logprobs.argmax(dim=-1) == target).cpu()
    sizes = [len(cont) for _, cont in rows]
    return [(s.sum().item(), bool(g.all())) for s, g in zip(scores.split(sizes), greedy.split(sizes))]


def document_loglikelihood(model, tokenizer, text: str, batch_size: int = 8) -> float:
    """log p(text) after BOS, scored in the windows perplexity() uses: a harness perplexity task and
    `python eval.py --text_file` then agree. (The harness's own models give a last, partial window the full context
    before it; ours starts it afresh like every other window.)"""
    if not text:
        return 0.0
    result = perplexity(model, tokenizer, text, model.config.block_size, batch_size)
    return -result["nll"] * result["tokens"]


def generate_texts(model, tokenizer, requests: list[tuple[str, dict]], batch_size: int = 8, max_gen_toks: int = 256,
                   progress: bool = False) -> list[str]:
    """The harness's generate_until: each (context, gen_kwargs) continued by generate.generate, greedy unless
    gen_kwargs asks do_sample, for up to gen_kwargs' max_gen_toks tokens, then cut before its first `until` string.

    A context is cut from the left to leave room for the new tokens. Requests that share max_gen_toks and temperature
    decode together, longest first, each row at its own positions. A row stops early only at a stop id: the stop
    strings cut the text afterwards.
    """
    block = model.config.block_size
    settings = [generation_settings(kwargs, max_gen_toks, block) for _, kwargs in requests]
    prompts = [tokenizer.encode(context, bos=True)[-(block - new_tokens):]
               for (context, _), (new_tokens, _) in zip(requests, settings)]
    order = sorted(range(len(requests)), key=lambda i: (settings[i], -len(prompts[i])))
    batches = []
    for _, same in itertools.groupby(order, key=settings.__getitem__):
        group = list(same)
        batches += [group[start: start + batch_size] for start in range(0, len(group), batch_size)]
    texts = [None] * len(requests)
    for batch in tqdm(batches, desc="generate_until", disable=not progress):
        new_tokens, temperature = settings[batch[0]]
        outputs, _ = generate(model, [prompts[i] for i in batch], new_tokens, temperature=temperature,
                              stop_ids=tokenizer.stop_ids)
        for i, new in zip(batch, outputs):
            texts[i] = cut_at_stops(continuation_text(tokenizer, prompts[i], new), requests[i][1].get("until"))
    return texts


def generation_settings(gen_kwargs: dict, max_gen_toks: int, block_size: int) -> tuple[int, float]:
    """(new tokens, temperature) of a request's gen_kwargs."""
    new_tokens = int(gen_kwargs.get("max_gen_toks", max_gen_toks))
    if new_tokens >= block_size:
        raise ValueError(f"max_gen_toks {new_tokens} leaves no room for a prompt in the model's context of "
                         f"{block_size}")
    return new_tokens, (float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0)


def continuation_text(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text `new` adds after `prompt`. Decoded alone, sentencepiece would drop the leading space of its first
    piece, so the prompt is decoded with it and its own text taken off."""
    return tokenizer.decode(prompt + new)[len(tokenizer.decode(prompt)):]


def cut_at_stops(text: str, until) -> str:
    """text up to the first occurrence of any stop string (`until`: a string, a list of them, or None)."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def harness_model_class(TemplateLM):
    """Our model as a harness model: a subclass of the harness's TemplateLM, which turns (context, continuation)
    strings into token lists as every harness model does (the whole encoded once, the context once, the
    continuation being the tokens past the context's). It is built by this function, from the class main() passes,
    because lm_eval is optional: a class at module level would make `import eval` need it."""

    class HarnessLM(TemplateLM):
        def __init__(self, model, tokenizer, batch_size: int = 8, progress: bool = True):
            super().__init__()
            self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress
            self.generator = None  # generate_until's model, made on first use

        @property
        def eot_token_id(self):
            return self.tokenizer.eos_id

        @property
        def prefix_token_id(self):  # the context of an empty context: BOS, as every prompt of ours starts
            return self.tokenizer.bos_id

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.tokenizer.encode(string, bos=add_special_tokens is not False)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            pairs = [(context, continuation) for _, context, continuation in requests]
            return continuation_logprobs(self.model, pairs, self.batch_size, self.progress and not disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            texts = tqdm([r.args[0] for r in requests], desc="loglikelihood_rolling",
                         disable=not self.progress or disable_tqdm)
            return [document_loglikelihood(self.model, self.tokenizer, text, self.batch_size) for text in texts]

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            if self.generator is None:
                self.generator = self.model.twin()  # it keeps a KV cache; self.model stays without one
            return generate_texts(self.generator, self.tokenizer, [r.args for r in requests], self.batch_size,
                                  progress=self.progress and not disable_tqdm)

    return HarnessLM


def task_manager(lm_eval, tasks: list[str], include_path=None):
    """The harness's index of tasks, with the task configs under include_path. Indexing the harness's own 14,000
    configs takes about 15 s, so include_path alone is indexed when it holds every task asked for."""
    if include_path is not None:
        local = lm_eval.tasks.TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = lm_eval.tasks.TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}: `lm-eval ls tasks` lists the harness's tasks, and "
                         f"--include_path DIR adds a folder of task configs")
    return manager


def run_tasks(lm_eval, model, tokenizer, args, rank=None):
    """--tasks: the harness's table on stdout, and with --output_path its results as JSON."""
    tasks = [t for t in args.tasks.split(",") if t]
    lm = harness_model_class(lm_eval.api.model.TemplateLM)(model, tokenizer, args.batch_size, progress=not rank)
    results = lm_eval.evaluator.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
        device=args.device, log_samples=False, task_manager=task_manager(lm_eval, tasks, args.include_path))
    if results is None or rank:  # tensor parallel: every rank computed the same, rank 0 reports
        return
    precision = {} if args.precision is None else {"precision": args.precision}
    results["config"].update(model=str(args.checkpoint_path), dtype=str(model.tok_embeddings.weight.dtype), **precision)
    print(f"{args.checkpoint_path}" + (f" at {args.precision} bits" if args.precision else "") +
          (f", at most {args.limit:g} documents a task" if args.limit else ""))
    print(lm_eval.utils.make_table(results))
    if results.get("groups"):
        print(lm_eval.utils.make_table(results, "groups"))
    if args.output_path:
        args.output_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.output_path) as f:
            f.write(json.dumps(results, indent=2, default=lm_eval.utils.handle_non_serializable).encode())
        print(f"wrote {args.output_path}")
    return results


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--text_file", type=Path, default=None, help="default: the stdlib held-out split")
    p.add_argument("--seq_len", type=cli.at_least(2), default=None, help="window length (default: the model's "
                   "block_size)")
    p.add_argument("--batch_size", type=cli.at_least(1), default=8)
    p.add_argument("--max_tokens", type=cli.at_least(1), default=None, help="score only the first N tokens")
    p.add_argument("--device", type=cli.device, default=default_device())
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--precision", type=int, default=None, help="bits per weight of an any-precision model (anyprec.py)")
    harness = p.add_argument_group("task accuracy with lm-evaluation-harness (pip install lm_eval)")
    harness.add_argument("--tasks", default=None, help="comma-separated harness tasks, e.g. hellaswag,arc_easy")
    harness.add_argument("--include_path", type=Path, default=None, help="a folder of task configs, e.g. tests/tasks")
    harness.add_argument("--num_fewshot", type=cli.at_least(0), default=None, help="default: each task's own")
    harness.add_argument("--limit", type=cli.positive, default=None, help="at most N documents per task (a fraction "
                         "if < 1)")
    harness.add_argument("--output_path", type=Path, default=None, help="write the results as JSON to this file")
    return p.parse_args(argv)


def read_text_file(path: Path) -> str:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"--text_file {path} is not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"--text_file {path}: {e.strerror}") from None
    if not text.strip():
        raise ValueError(f"--text_file {path} is empty: there is nothing to score")
    return text


def run_perplexity(model, tokenizer, args):
    text = stdlib_texts("heldout") if args.text_file is None else read_text_file(args.text_file)
    seq_len = args.seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise ValueError(f"--seq_len {seq_len} exceeds the model's block_size {model.config.block_size}")
    t0 = time.perf_counter()
    result = perplexity(model, tokenizer, text, seq_len, args.batch_size, args.max_tokens)
    seconds = time.perf_counter() - t0
    source = args.text_file or "stdlib held-out split"
    print(f"{'checkpoint':>11}: {args.checkpoint_path}\n{'text':>11}: {source}\n{'seq_len':>11}: {seq_len}")
    if args.precision is not None:
        print(f"{'precision':>11}: {args.precision} bits")
    print(f"{'tokens':>11}: {result['tokens']}\n{'mean NLL':>11}: {result['nll']:.4f}\n"
          f"{'perplexity':>11}: {result['perplexity']:.4f}\n{'time':>11}: {seconds:.1f} s")


def main(argv=None):
    args = parse_args(argv)
    if args.tasks:  # the harness is optional: found out before a model is loaded
        try:
            import lm_eval.api.model
            import lm_eval.evaluator
            import lm_eval.tasks
            import lm_eval.utils
        except ImportError as e:
            raise ValueError(f"--tasks needs EleutherAI's lm-evaluation-harness ({e}): "
                             f"pip install 'lm_eval>=0.4.10,<0.5'") from None
    rank = maybe_init_dist(args.device)  # under torchrun: tensor parallelism, one shard of every layer per rank
    if rank:  # every rank computes the same figures; rank 0 prints them
        sys.stdout = open(os.devnull, "w")
    model = load_model(args.checkpoint_path, args.device, dtype_of(args), tp=rank is not None,
                       precisions=None if args.precision is None else [args.precision])
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    if args.tasks:
        return run_tasks(lm_eval, model, tokenizer, args, rank)
    run_perplexity(model, tokenizer, args)


if __name__ == "__main__":
    cli.run(main)
