"""Perplexity of any checkpoint the project loads, over the held-out split of the Python standard library's source
(the tiny model's corpus) or a text file, in non-overlapping windows.

    python eval.py                                    # the shipped tiny model on its held-out split
    python eval.py --checkpoint_path DIR/model_int4.g128.pth --seq_len 512
    python eval.py --text_file notes.txt
"""
import argparse
import hashlib
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

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


def calibration_windows(tokenizer, samples: int = 128, seq_len: int = 512, text_file=None, seed: int = 0):
    """[samples, seq_len] token windows at random offsets, for GPTQ and any-precision calibration.

    They come from the train split, not the held-out one, because perplexity is measured on the held-out split and
    a quantizer must not have seen it (the GPTQ paper calibrates on C4 train and evaluates elsewhere too).
    """
    if text_file is not None and not Path(text_file).is_file():
        raise FileNotFoundError(f"--calibration_file {text_file} not found")
    texts = stdlib_texts("train") if text_file is None else [Path(text_file).read_text()]
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


def main(argv=None):
    from generate import DEFAULT_CHECKPOINT, default_device, load_model
    from tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--text_file", type=Path, default=None, help="default: the stdlib held-out split")
    p.add_argument("--seq_len", type=int, default=None, help="window length (default: the model's block_size)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--precision", type=int, default=None, help="bits per weight of an any-precision model (anyprec.py)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)
    model = load_model(args.checkpoint_path, args.device, dtype,
                       precisions=None if args.precision is None else [args.precision])
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    if args.text_file is not None and not args.text_file.is_file():
        raise FileNotFoundError(f"--text_file {args.text_file} not found")
    text = stdlib_texts("heldout") if args.text_file is None else args.text_file.read_text()
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


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
