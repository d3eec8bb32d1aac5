"""Train the shipped tiny models from nothing but this machine's Python standard library source.

    python scripts/train_tiny.py                 # tokenizer, then checkpoints/tiny-py and checkpoints/tiny-py-draft

A sentencepiece BPE tokenizer (4096 pieces, byte fallback, whitespace kept as is) is trained on the train split
(eval.py's stdlib_split: a stable hash of each file's path holds out about 5%), then Llama-architecture models:
tiny-py (about 6M parameters, GQA) and tiny-py-draft (about 1M, same tokenizer, the speculative draft). Each
folder gets model.pth, config.json, tokenizer.model, loss.png and a README.md with the held-out perplexity.
Deterministic given --seed on a given machine; bf16 autocast on CUDA.
"""
import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from eval import encode_documents, perplexity, stdlib_texts  # noqa: E402
from generate import load_model  # noqa: E402
from model import ModelArgs, Transformer, atomic_write  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

MODELS = {
    "tiny-py": ModelArgs(block_size=512, vocab_size=4096, n_layer=5, n_head=8, n_kv_heads=4, dim=256,
                         intermediate_size=768),
    "tiny-py-draft": ModelArgs(block_size=512, vocab_size=4096, n_layer=3, n_head=4, n_kv_heads=2, dim=128,
                               intermediate_size=384, tie_embeddings=True),
}


def train_tokenizer(texts: list[str], path: Path, vocab_size: int = 4096):
    """BPE over chunks of whole lines, so that newlines and indentation can join pieces; nothing is normalised."""
    import sentencepiece

    def chunks():
        for text in texts:
            chunk = ""
            for line in text.splitlines(keepends=True):
                if len(chunk) + len(line) > 2000 and chunk:
                    yield chunk
                    chunk = ""
                chunk += line[:2000]
            if chunk:
                yield chunk

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=chunks(), model_writer=model, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=True, max_sentence_length=4096, character_coverage=0.9999, num_threads=os.cpu_count(),
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    write_atomic(path, model.getvalue())


def write_atomic(path: Path, data: bytes):
    with atomic_write(path) as f:
        f.write(data)


def init_weights(model: Transformer, config: ModelArgs):
    """GPT-2 style: N(0, 0.02), the projections into the residual stream scaled down by depth."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        else:
            std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)


def train_model(name: str, config: ModelArgs, train: torch.Tensor, heldout: torch.Tensor, args, out: Path):
    device = args.device
    torch.manual_seed(args.seed)
    model = Transformer(config).to(device)
    init_weights(model, config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device == "cuda")
    steps, T, B = args.steps[name], config.block_size, args.batch_size
    warmup = max(1, steps // 50)
    generator = torch.Generator().manual_seed(args.seed)
    step_fn = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    history = []  # (step, train loss, held-out loss)
    held_windows = heldout[: 16 * T + 1]
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True)
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - T - 1, (B,), generator=generator)
        batch = torch.stack([train[s: s + T + 1] for s in starts.tolist()]).to(device)
        with autocast:
            logits = step_fn(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == steps - 1:
            model.eval()
            with torch.no_grad(), autocast:
                x = held_windows[: 16 * T].view(16, T).to(device)
                y = held_windows[1: 16 * T + 1].view(16, T).to(device)
                held = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item()
            model.train()
            history.append((step, loss.item(), held))
            bar.set_postfix(loss=f"{loss.item():.3f}", heldout=f"{held:.3f}", lr=f"{lr:.2e}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    # Stored in bf16: both models fit the repository's 16 MB budget, and bf16 is how GPUs run them.
    state = {k: v.detach().to("cpu", torch.bfloat16)
             for k, v in model.state_dict().items() if not (config.tie_embeddings and k == "output.weight")}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(out / "model.pth", buffer.getvalue())
    write_atomic(out / "config.json", (json.dumps(config.__dict__, indent=2) + "\n").encode())
    return n_params, history


def plot_loss(history, path: Path, title: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-dev.txt): no loss.png", file=sys.stderr)
        return
    steps, train, held = zip(*history)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, train, label="train (one batch)")
    ax.plot(steps, held, label="held-out (16 windows)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())


def unigram_perplexity(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """The floor any model must beat: token frequencies of the train split (add-one smoothed) on the held-out."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[heldout[1:]].mean().item())


README = """# {name}

A {n_params:,}-parameter Llama-architecture model ({shape}) trained by `scripts/train_tiny.py` on the Python
{py} standard library's own source (train split: {train_tokens:,} tokens), with a {vocab}-piece sentencepiece
BPE tokenizer trained on the same split. {role}

| | |
|---|---|
| steps x batch x length | {steps} x {batch} x {block} ({seen:,} tokens seen) |
| optimiser | AdamW, lr {lr} (warmup, cosine to 10%), betas (0.9, 0.95), weight decay 0.1, clip 1.0 |
| seed, device, time | {seed}, {device}, {minutes:.0f} min |
| held-out perplexity | **{ppl:.3f}** over {heldout_tokens:,} tokens in windows of {block} (`python eval.py --checkpoint_path checkpoints/{name}/model.pth`) |
| unigram perplexity | {unigram:.1f} (train-split token frequencies on the same held-out tokens) |

Reproduce: `python scripts/train_tiny.py --seed {seed}` (the figures depend on this Python's standard library).
![loss](loss.png)
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, nargs=2, default=None, metavar=("TINY", "DRAFT"),
                   help="optimizer steps for tiny-py and tiny-py-draft (default 1000 and 400: about 55 minutes on 2 CPU cores)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    args.steps = dict(zip(MODELS, args.steps or (1000, 400)))
    torch.use_deterministic_algorithms(True, warn_only=True)

    t0 = time.perf_counter()
    train_texts, heldout_texts = stdlib_texts("train"), stdlib_texts("heldout")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = args.out_dir / "tokenizer.model"
    train_tokenizer(train_texts, tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    train = encode_documents(tokenizer, train_texts).to(torch.int16)  # 4096 pieces fit; a quarter of the memory
    heldout = encode_documents(tokenizer, heldout_texts)
    print(f"tokenizer and data in {time.perf_counter() - t0:.0f} s: {len(train):,} train tokens, "
          f"{len(heldout):,} held-out tokens", file=sys.stderr)
    train = train.long()
    unigram = unigram_perplexity(train, heldout, tokenizer.vocab_size)
    for name in args.models:
        config, out = MODELS[name], args.out_dir / name
        start = time.perf_counter()
        n_params, history = train_model(name, config, train, heldout, args, out)
        minutes = (time.perf_counter() - start) / 60
        write_atomic(out / "tokenizer.model", tokenizer_path.read_bytes())
        plot_loss(history, out / "loss.png", f"{name}: {n_params / 1e6:.1f}M parameters")
        # Scored from the file as shipped (bf16 weights, run in fp32), exactly what eval.py reports.
        ppl = perplexity(load_model(out / "model.pth", "cpu", torch.float32), tokenizer, heldout_texts, config.block_size)
        role = ("The target model of the project's examples and tests." if name == "tiny-py" else
                "The draft model for speculative decoding with tiny-py (same tokenizer).")
        shape = (f"dim {config.dim}, {config.n_layer} layers, {config.n_head} heads / {config.n_kv_heads} kv heads, "
                 f"ffn {config.intermediate_size}" + (", tied embeddings" if config.tie_embeddings else ""))
        text = README.format(
            name=name, n_params=n_params, shape=shape, py=sys.version.split()[0], train_tokens=len(train),
            vocab=tokenizer.vocab_size, role=role, steps=args.steps[name], batch=args.batch_size,
            block=config.block_size, seen=args.steps[name] * args.batch_size * config.block_size, lr=args.lr,
            seed=args.seed, device=args.device, minutes=minutes, ppl=ppl["perplexity"], heldout_tokens=ppl["tokens"],
            unigram=unigram)
        write_atomic(out / "README.md", text.encode())
        print(f"{name}: held-out perplexity {ppl['perplexity']:.3f} (unigram {unigram:.1f}), {minutes:.1f} min",
              file=sys.stderr)
    tokenizer_path.unlink()


if __name__ == "__main__":
    main()
