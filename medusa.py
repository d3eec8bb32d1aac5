"""Medusa (Cai et al. 2024): extra heads on a frozen model guess the next few tokens as a tree of candidates; one
forward of the base model over the whole tree checks them all, and each step emits the longest accepted path plus
the token that follows it.

    python medusa.py train --checkpoint_path checkpoints/tiny-py/model.pth --num_heads 4   # heads beside the model
    python medusa.py calibrate --checkpoint_path checkpoints/tiny-py/model.pth             # re-fit their tree
    python generate.py --medusa_heads checkpoints/tiny-py/medusa_heads.safetensors --temperature 0

Head k (k = 1..K) reads the base model's final-norm hidden state at position t and predicts token t+k+1 through a
residual SiLU block and the base model's own frozen output head (Medusa-1: the base is untouched). Acceptance:
temperature 0 is greedy (output identical to plain greedy decoding); temperature > 0 samples each node's next
token from the base model and accepts a child only if it is that sample, so every emitted token is a true draw
from the base model; `typical` is the paper's typical acceptance (faster, not distribution-preserving).

Needs model.py, tokenizer.py, eval.py (the corpus it trains on), cli.py and generate.py, whose loop runs the
`decoder` made here.
"""
import argparse
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import cli
from eval import calibration_windows
from generate import (DEFAULT_CHECKPOINT, Decoder, compile_prefill, compile_step, default_device, generate, load_model,
                      logits_to_probs, sample, sample_from)
from model import atomic_write, load_state
from tokenizer import load_tokenizer

# The paper's typical acceptance (its posterior_threshold epsilon and posterior_alpha delta): a node is accepted when
# its parent gives it more than min(epsilon, delta * exp(-entropy)).
TYPICAL = (0.09, 0.3)

# ---------------------------------------------------------------------------------------------------------------
# Trees. A choice is a path of per-depth ranks: [0, 1] is head 1's top token followed by head 2's second.

# The reference project's tree for its Vicuna-7B heads (Medusa, medusa_choices.py): 63 nodes, 4 deep.
MC_SIM_7B_63 = [[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
                [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8],
                [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0],
                [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0],
                [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1],
                [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0]]


@dataclass
class Tree:
    """Node 0 is the root (the token already chosen), then the choices sorted by depth, so parents come first."""
    choices: list
    parent: Tensor  # [T] (the root is its own parent)
    depth: Tensor  # [T], 0 for the root
    src: Tensor  # [T] index into the candidate pool [root, top-R of head 1, ..., top-R of head D]
    anc: Tensor  # [T, D+1] the ancestor at each depth, padded with the node itself past its own depth
    tmask: Tensor  # [T, T] bool: node j is node i or one of its ancestors
    num_heads: int  # D, the heads the tree reads
    top: int  # R, the largest rank + 1


def build_tree(choices, num_heads: int, device=None) -> Tree:
    paths = [tuple(c) if isinstance(c, (list, tuple)) else c for c in choices] if isinstance(choices, list) else []
    if not paths or not all(isinstance(p, tuple) and p and all(type(r) is int and r >= 0 for r in p) for p in paths):
        raise ValueError("--medusa_tree: every choice must be a non-empty list of ranks >= 0, e.g. [[0], [1], [0, 0]]")
    twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
    if twice:
        raise ValueError(f"--medusa_tree lists {list(twice)} twice")
    orphan = next((p for p in paths if len(p) > 1 and p[:-1] not in paths), None)
    if orphan:
        raise ValueError(f"--medusa_tree is not prefix-closed: {list(orphan)} is there but not its parent "
                         f"{list(orphan[:-1])}")
    D = max(map(len, paths))
    if D > num_heads:
        raise ValueError(f"--medusa_tree is {D} deep but there are {num_heads} heads: use a tree at most {num_heads} "
                         f"deep (python medusa.py calibrate builds one) or heads trained with --num_heads {D}")
    paths = [()] + sorted(paths, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(paths)}
    R = 1 + max(max(p) for p in paths[1:])
    parent = [index[p[:-1]] if p else 0 for p in paths]
    src = [1 + R * (len(p) - 1) + p[-1] if p else 0 for p in paths]
    anc = [[index[p[:j]] if j <= len(p) else index[p] for j in range(D + 1)] for p in paths]
    tmask = torch.zeros(len(paths), len(paths), dtype=torch.bool)
    for i, row in enumerate(anc):
        tmask[i, row] = True
    return Tree(choices=[list(p) for p in paths[1:]], parent=torch.tensor(parent, device=device),
                depth=torch.tensor([len(p) for p in paths], device=device), src=torch.tensor(src, device=device),
                anc=torch.tensor(anc, device=device), tmask=tmask.to(device), num_heads=D, top=R)


def best_tree(accuracy: list[list[float]], nodes: int) -> tuple[list, float]:
    """The tree of `nodes` nodes with the largest expected accepted length, greedily (paper §2.3.3).

    accuracy[k][r]: how often head k+1's r-th ranked token is right. Taking heads as independent, a node is
    accepted with the product of its path's accuracies, and a step emits 1 + the sum of that over the nodes.
    A child is never worth more than its parent, so picking the best node on the frontier keeps the tree
    prefix-closed."""
    frontier = {(r,): a for r, a in enumerate(accuracy[0])}
    chosen, expected = [], 1.0
    while frontier and len(chosen) < nodes:
        path = max(frontier, key=frontier.get)
        value = frontier.pop(path)
        if value <= 0:  # a node that is never accepted only costs compute
            break
        chosen.append(list(path))
        expected += value
        if len(path) < len(accuracy):
            frontier.update({path + (r,): value * a for r, a in enumerate(accuracy[len(path)])})
    return chosen, expected


# ---------------------------------------------------------------------------------------------------------------
# Heads

class ResBlock(nn.Module):
    """x + SiLU(W x + b); W and b start at zero, so the block starts as the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K heads, each `num_layers` ResBlocks (never shared) and then the base model's output head, passed in.

    The reference project's v1 checkpoints give each head its own output projection (vocab_size set); heads trained
    here share the base's frozen one, so every head starts out equal to the base model's next-token prediction.
    """

    def __init__(self, dim: int, num_heads: int, num_layers: int = 1, vocab_size=None):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(*(ResBlock(dim) for _ in range(num_layers)))
                                    for _ in range(num_heads))
        self.proj = None if vocab_size is None else nn.ModuleList(
            nn.Linear(dim, vocab_size, bias=False) for _ in range(num_heads))

    def head(self, k: int, h: Tensor, output: nn.Module) -> Tensor:
        """Logits [..., V] of head k+1 (0-based k) from hidden states [..., dim]."""
        return (output if self.proj is None else self.proj[k])(self.blocks[k](h))

    def forward(self, h: Tensor, output: nn.Module) -> Tensor:
        """h [..., dim] -> logits [..., K, V]."""
        x = torch.stack([block(h) for block in self.blocks], dim=-2)  # [..., K, dim]
        if self.proj is None:
            return output(x)  # one read of the shared output head for all K
        return torch.stack([proj(x[..., k, :]) for k, proj in enumerate(self.proj)], dim=-2)


def save_heads(heads: MedusaHeads, path: Path, config: dict):
    """safetensors (bf16), then the JSON config beside it, each written whole under a temporary name and renamed."""
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in heads.state_dict().items()}
    with atomic_write(path) as f:
        f.write(safetensors.torch.save(state))
    write_config(path, config)


def write_config(heads_path: Path, config: dict):
    """The JSON beside the heads, holding the hash of the heads it was written for: a crash between writing the
    heads and their JSON leaves a pair that load_heads refuses, never one it mixes."""
    config = dict(config, heads_sha256=file_sha256(heads_path))
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in config.items()) + "\n}\n"
    with atomic_write(Path(heads_path).with_suffix(".json")) as f:
        f.write(text.encode())


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_heads(path, model) -> tuple[MedusaHeads, dict]:
    """Heads saved here, or by the reference project (medusa_lm_head.safetensors / .pt), on the model's device and
    dtype; returns them with their JSON config ({} when there is none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Medusa heads {path} not found: train them with "
                                f"python medusa.py train --checkpoint_path <model.pth>")
    heads = heads_for(path, read_heads(path), model)
    config_path = path.with_suffix(".json")
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # not JSON, not UTF-8, or not an object
        raise ValueError(f"{config_path} is damaged ({e}): run python medusa.py calibrate to write it again") from None
    if config.get("heads_sha256", file_sha256(path)) != file_sha256(path):
        raise ValueError(f"{config_path} was written for other heads than {path.name} (an interrupted training?): "
                         f"run python medusa.py calibrate to fit their tree again")
    # The embedding's dtype is the model's: a quantized output head holds integers.
    return heads.to(model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype).eval(), config


def read_heads(path: Path) -> dict:
    """The tensors of a heads file under our names: safetensors, or the reference project's .pt."""
    try:
        state = safetensors.torch.load_file(path) if path.suffix == ".safetensors" else load_state(path)
    except Exception as e:  # safetensors' errors share no base class but Exception
        if isinstance(e, ValueError):
            raise
        raise ValueError(f"{path} is not a readable safetensors file ({str(e)[:120]}): train the heads again") from None
    return {reference_name(k): v for k, v in state.items()}


def heads_for(path: Path, state: dict, model) -> MedusaHeads:
    """MedusaHeads of the shape `state` describes, loaded, after checking that they fit `model`."""
    heads_found = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not heads_found or heads_found != set(range(len(heads_found))) or "blocks.0.0.linear.weight" not in state:
        raise ValueError(f"{path} holds no Medusa heads (expected blocks.K.L.linear.* or the reference's K.L.linear.*)")
    num_layers = len({k.split(".")[2] for k in state if k.startswith("blocks.0.")})
    dim, vocab = state["blocks.0.0.linear.weight"].shape[1], model.config.vocab_size
    if dim != model.config.dim:
        raise ValueError(f"{path} was trained for another model (width {dim}, this model's is {model.config.dim}): "
                         f"use heads trained on this checkpoint")
    if "proj.0.weight" in state and state["proj.0.weight"].shape[0] != vocab:
        raise ValueError(f"{path} was trained for another model (a vocabulary of {state['proj.0.weight'].shape[0]}, "
                         f"this model's is {vocab}): use heads trained on this checkpoint")
    heads = MedusaHeads(dim, len(heads_found), num_layers, vocab if "proj.0.weight" in state else None)
    try:
        heads.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} has malformed Medusa heads: {str(e).splitlines()[0]}") from None
    if not all(torch.isfinite(p).all() for p in heads.parameters()):
        raise ValueError(f"{path} is damaged: its heads hold NaN or infinite values")
    return heads


def reference_name(name: str) -> str:
    """FasterDecoding/Medusa names its head `{k}.{layer}.linear.weight|bias`, and in v1 checkpoints each head's
    own projection `{k}.{num_layers}.weight`; our names pass through."""
    m = re.fullmatch(r"(?:medusa_head\.)?(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)", name)
    if m is None:
        return name
    k, layer, what = m.groups()
    return f"proj.{k}.weight" if what == "weight" else f"blocks.{k}.{layer}.{what}"


def load_tree(spec, config: dict, num_heads: int, device=None) -> Tree:
    """--medusa_tree: 'mc_sim_7b_63', a JSON file (a list of choices, or an object with medusa_choices), or None
    for the tree stored with the heads (the reference's mc_sim_7b_63 if they have none)."""
    if spec is None:
        choices = config.get("medusa_choices", MC_SIM_7B_63)
    elif spec == "mc_sim_7b_63":
        choices = MC_SIM_7B_63
    elif Path(spec).is_file():
        try:
            choices = json.loads(Path(spec).read_text())
        except ValueError as e:
            raise ValueError(f"--medusa_tree {spec} is not valid JSON ({e})") from None
        choices = choices.get("medusa_choices") if isinstance(choices, dict) else choices
    else:
        raise FileNotFoundError(f"--medusa_tree {spec}: neither mc_sim_7b_63 nor a JSON file of medusa_choices")
    return build_tree(choices, num_heads, device)


# ---------------------------------------------------------------------------------------------------------------
# Tree decoding: prefill, then steps of propose -> one forward over the tree -> choose -> commit, on static shapes.

def candidate_pool(tree: Tree, root: Tensor, head_logits: Tensor) -> Tensor:
    """root [B], head_logits [B, K, V] -> [B, 1 + D*R]: the root, then each head's top R tokens."""
    top = head_logits[:, : tree.num_heads].topk(tree.top, dim=-1).indices  # [B, D, R]
    return torch.cat([root[:, None], top.flatten(1)], dim=1)


def tree_mask(tree: Tree, L: Tensor, n_keys: int, sliding_window=None) -> Tensor:
    """[B, 1, T, n_keys] bool: a node sees the row's cache (slots < L) and its own ancestors, written at L + node."""
    T = tree.parent.shape[0]
    slots = torch.arange(n_keys, device=L.device)
    rel = slots - L[:, None]  # [B, n_keys] slot relative to the root's
    in_tree = tree.tmask[:, rel.clamp(0, T - 1)].transpose(0, 1)  # [B, T, n_keys]
    mask = (rel < 0)[:, None, :] | ((rel < T)[:, None, :] & in_tree)
    if sliding_window is not None:  # below L, a slot is its token's position
        mask &= (rel >= 0)[:, None, :] | (slots > (L[:, None] + tree.depth)[..., None] - sliding_window)
    return mask[:, None]


def tree_hidden(model, tree: Tree, tokens: Tensor, L: Tensor) -> Tensor:
    """One base forward over the tree: tokens [B, T] at positions L + depth, written to slots L..L+T-1."""
    T = tokens.shape[1]
    mask = tree_mask(tree, L, model.max_seq_length, model.config.sliding_window)
    return model.hidden(tokens, L[:, None] + tree.depth, cache_pos=L[:, None] + torch.arange(T, device=L.device),
                        mask=mask)  # [B, T, dim]


def choose(tree: Tree, tokens: Tensor, logits: Tensor, temperature: float, top_k=None, top_p=None, typical=None):
    """tokens [B, T], logits [B, T, V] -> (last [B] the deepest accepted node, after [B] the token to emit after it).

    x[i] is the token the base model emits after node i: its argmax (greedy, typical), or one independent draw
    from its warped distribution (sampling). A node is accepted when its token is x[parent] (for typical: when
    the parent gives it more than min(eps, delta * exp(-entropy))) and every ancestor is accepted. Siblings are
    distinct tokens, so with greedy or sampling the accepted nodes form one chain, the longest match."""
    parent = tree.parent
    score = tree.depth.float()
    if typical is None:
        x = logits.argmax(-1) if temperature == 0 else sample_from(logits_to_probs(logits, temperature, top_k, top_p))
        ok = tokens == x[:, parent]
    else:
        eps, delta = typical
        probs = logits_to_probs(logits, max(temperature, 1e-5), top_k, top_p)  # [B, T, V]
        x = logits.argmax(-1)
        entropy = -torch.special.xlogy(probs, probs).sum(-1)  # [B, T]
        p_token = probs[:, parent].gather(2, tokens[..., None])[..., 0]  # [B, T] parent's probability of the node
        ok = p_token > torch.clamp(delta * torch.exp(-entropy[:, parent]), max=eps)
        # Of the longest accepted paths, the likeliest. An accepted node's log-probability is above
        # log(delta / V) > -20, so a path's sum never outweighs one level of depth (1000).
        in_path = tree.tmask & (tree.depth > 0)
        score = score * 1000 + torch.where(in_path, p_token.log()[:, None, :], 0).sum(-1)
    ok = ok | (tree.depth == 0)
    reached = (ok[:, None, :] | ~tree.tmask).all(-1)  # [B, T]: the node and all its ancestors accepted
    last = torch.where(reached, score, -float("inf")).argmax(-1)
    return last, x.gather(1, last[:, None])[:, 0]


def commit(model, tree: Tree, last: Tensor, L: Tensor):
    """Move the accepted path's KV entries from slots L + node to L + depth, D+1 slots wide always (slots past the
    path get copies that are masked, then overwritten)."""
    path = tree.anc[last]  # [B, D+1]
    dst, src = L[:, None] + torch.arange(path.shape[1], device=L.device), L[:, None] + path
    for layer in model.layers:
        layer.attention.kv_cache.move(src, dst)
    return path


def medusa_prefill(model, heads, tree: Tree, tokens, input_pos, last, temperature: float, top_k, top_p, typical):
    """tokens, input_pos [B, S] (rows right-padded); last [B] each row's last prompt index -> candidate pool."""
    hidden = model.hidden(tokens, input_pos)[torch.arange(tokens.shape[0], device=tokens.device), last]  # [B, dim]
    logits = model.output(hidden)
    root = logits.argmax(-1) if typical is not None else sample(logits, temperature, top_k, top_p)
    return candidate_pool(tree, root, heads(hidden, model.output))


def medusa_step(model, heads, tree: Tree, pool, L, active, temperature: float, top_k, top_p, typical):
    """One base forward. pool [B, 1+D*R] the root and candidates, L [B] each row's cache length (the root's
    position), active [B] rows still generating. Returns the next (pool, L) and out [B, D+2]: the tokens the step
    emits (the first n+1 are valid), then n+1."""
    # A row's last step may run up to D tokens past max_new_tokens; once finished it idles at slot 0, so that no
    # row ever writes beyond prompt + max_new_tokens + T (what generate allocates).
    L = torch.where(active, L, 0)
    tokens = pool[:, tree.src]  # [B, T]
    hidden = tree_hidden(model, tree, tokens, L)
    last, after = choose(tree, tokens, model.output(hidden), temperature, top_k, top_p, typical)
    path = commit(model, tree, last, L)
    n = tree.depth[last]  # [B] accepted candidates
    emitted = torch.cat([tokens.gather(1, path[:, 1:]), after[:, None]], dim=1).scatter(1, n[:, None], after[:, None])
    # The next proposals come from the last accepted node's hidden state, the one that chose `after`.
    head_logits = heads(hidden[torch.arange(L.shape[0], device=L.device), last], model.output)  # [B, K, V]
    next_L = L + torch.where(active, n + 1, 0)
    return candidate_pool(tree, after, head_logits), next_L, torch.cat([emitted, (n + 1)[:, None]], dim=1)


def decoder(model, heads: MedusaHeads, tree: Tree, temperature=0.0, top_k=None, top_p=None, typical=False,
            compile=False, compile_prefill_too=False) -> Decoder:
    """Medusa decoding for generate.generate: each step runs the model once over the tree and emits 1 to D + 1
    tokens, the model's own at temperature 0 (and exact draws from it above, unless `typical`: the paper's typical
    acceptance, faster but not the model's distribution). State: the candidate pool and each row's cache length.
    With compile, the step (tree, acceptance and cache compaction included) is one CUDA graph."""
    if tree.top > model.config.vocab_size:
        raise ValueError(f"--medusa_tree ranks up to {tree.top - 1}, beyond the vocabulary ({model.config.vocab_size})")
    device = model.tok_embeddings.weight.device
    tree = build_tree(tree.choices, tree.num_heads, device) if tree.parent.device != device else tree
    prefill_fn = compile_prefill(medusa_prefill) if compile_prefill_too else medusa_prefill
    step_fn = compile_step(medusa_step) if compile else medusa_step
    sampling = (temperature, top_k, top_p, TYPICAL if typical else None)

    def first(tokens, input_pos, last):
        pool = prefill_fn(model, heads, tree, tokens, input_pos, last, *sampling).clone()
        return pool[:, :1], torch.ones_like(last), (pool, last + 1)

    def step(state, active):
        pool, L, packed = step_fn(model, heads, tree, *state, active, *sampling)
        # Clones: a CUDA-graph replay overwrites its outputs.
        return packed[:, :-1].clone(), packed[:, -1].clone(), (pool.clone(), L.clone())

    # A running row's last step writes a whole tree past its cache length.
    return Decoder(first, step, (model,), lookahead=len(tree.choices) + 1)


def load(heads_path, model, tree=None) -> tuple[MedusaHeads, Tree]:
    """The heads at heads_path and the tree a --medusa_tree spec names (None: the one stored with the heads)."""
    heads, config = load_heads(heads_path, model)
    return heads, load_tree(tree, config, len(heads.blocks), model.tok_embeddings.weight.device)


# ---------------------------------------------------------------------------------------------------------------
# Training (Medusa-1: the base model frozen, only the heads learn) and calibration of the tree.

DISTILL_PROMPT = 32  # tokens of real text before a self-distilled continuation


def self_distill(base, windows: Tensor, temperature: float) -> Tensor:
    """The base model's own continuation of each window's first DISTILL_PROMPT tokens, as long as the window."""
    prompts = windows[:, :DISTILL_PROMPT].tolist()
    new, _ = generate(base, prompts, windows.shape[1] - DISTILL_PROMPT, temperature=temperature)
    return torch.tensor([p + n for p, n in zip(prompts, new)])


def training_batches(base, windows: Tensor, data: str, batch_size: int, temperature: float):
    """Batches of real windows ('stdlib'), of the base model's continuations of their beginnings ('selfdistill'),
    or of the two alternating ('mix')."""
    for step, batch in enumerate(windows.split(batch_size)):
        yield self_distill(base, batch, temperature) if data == "selfdistill" or (data == "mix" and step % 2) else batch


def train_heads(base, heads: MedusaHeads, batches, steps: int, lr: float, decay: float = 0.8, progress=True):
    """Minimise sum_k decay^k * CE(head_k(h_t), x_{t+k+1}) with the base frozen; returns the per-head loss, top-1
    and top-5 accuracy, averaged (exponentially) over the last steps."""
    device = base.output.weight.device
    autocast = torch.autocast(device.type, dtype=base.output.weight.dtype,
                              enabled=base.output.weight.dtype != torch.float32)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    K = len(heads.blocks)
    metrics = torch.zeros(3, K)  # loss, top-1, top-5: moving averages
    bar = tqdm(zip(range(steps), batches), total=steps, desc="medusa heads", disable=not progress)
    for step, x in bar:
        x = x.to(device)
        with torch.no_grad():
            h = base.hidden(x, torch.arange(x.shape[1], device=device))  # [B, S, dim]; the cache, if any, is scratch
        for k in range(K):
            shift = k + 2  # head k+1 at position t predicts token t+k+2: the base head predicts t+1
            with autocast:
                logits = heads.head(k, h[:, :-shift], base.output)  # [B, S-shift, V]
            labels = x[:, shift:]
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            (decay ** (k + 1) * loss).backward()  # one head's [B, S, V] logits alive at a time
            with torch.no_grad():
                hits = logits.topk(5, dim=-1).indices == labels[..., None]  # [B, S-shift, 5]
                now = torch.stack([loss, hits[..., 0].float().mean(), hits.any(-1).float().mean()]).cpu()
            metrics[:, k] = now if step == 0 else 0.9 * metrics[:, k] + 0.1 * now
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix_str(" ".join(f"{name}={'/'.join(f'{v:.2f}' for v in row.tolist())}"
                                     for name, row in zip(("loss", "top1", "top5"), metrics)))
    return dict(zip(("loss", "top1", "top5"), metrics.tolist()))


@torch.no_grad()
def rank_accuracy(base, heads: MedusaHeads, sequences: Tensor, top: int = 10) -> list[list[float]]:
    """accuracy[k][r]: how often head k+1's r-th ranked token is the one the base model itself emits k+1 tokens
    later, over greedy continuations of real text (sequences from self_distill at temperature 0)."""
    device = base.output.weight.device
    x = sequences.to(device)
    h = base.hidden(x, torch.arange(x.shape[1], device=device))
    accuracy = []
    for k in range(len(heads.blocks)):
        shift = k + 2
        start = DISTILL_PROMPT - 1  # from the last prompt token on, the next tokens are the base model's own
        logits = heads.head(k, h[:, start: -shift], base.output).float()
        labels = x[:, start + shift:]
        rank = (logits > logits.gather(-1, labels[..., None])).sum(-1).flatten()  # the label's rank, per position
        accuracy.append((torch.bincount(rank.clamp(max=top), minlength=top + 1)[:top] / rank.numel()).tolist())
    return accuracy


def expected_length(accuracy: list[list[float]], choices) -> float:
    """Tokens per step a tree is expected to emit, taking the heads as independent (as best_tree does)."""
    return 1 + sum(math.prod(accuracy[d][r] if r < len(accuracy[d]) else 0 for d, r in enumerate(c)) for c in choices)


def parse_args(argv=None):
    count = cli.at_least(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    train_p = commands.add_parser("train", help="train heads on the base model's own text, then fit their tree")
    calibrate_p = commands.add_parser("calibrate", help="measure the heads' accuracies, fit their tree")
    for q in (train_p, calibrate_p):
        q.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
        q.add_argument("--medusa_heads", type=Path, default=None, help="default: medusa_heads.safetensors beside it")
        q.add_argument("--nodes", type=count, default=63, help="tree size (without the root)")
        q.add_argument("--calibration_samples", type=count, default=64)
        q.add_argument("--seq_len", type=cli.at_least(DISTILL_PROMPT + 16), default=256)
        q.add_argument("--device", type=cli.device, default=default_device())
        q.add_argument("--seed", type=int, default=0)
    train_p.add_argument("--num_heads", type=count, default=4)
    train_p.add_argument("--num_layers", type=count, default=1, help="ResBlocks per head")
    train_p.add_argument("--steps", type=count, default=400)
    train_p.add_argument("--batch_size", type=count, default=16)
    train_p.add_argument("--lr", type=cli.positive, default=1e-3)
    train_p.add_argument("--decay", type=cli.positive, default=0.8, help="head k's loss weight is decay^k")
    train_p.add_argument("--data", choices=["mix", "stdlib", "selfdistill"], default="mix")
    train_p.add_argument("--distill_temperature", type=cli.at_least(0.0, float), default=0.0)
    train_p.set_defaults(split="train")
    calibrate_p.add_argument("--split", choices=["train", "heldout"], default="train",
                             help="train: fit the tree and save it with the heads; heldout: only report")
    return p.parse_args(argv)


def prepare(args, windows_before: int = 0):
    """The frozen base model, where the heads live, and windows of its corpus: windows_before for training, then
    --calibration_samples for the tree."""
    torch.manual_seed(args.seed)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    base = load_model(args.checkpoint_path, args.device, dtype).requires_grad_(False)
    heads_path = args.medusa_heads or args.checkpoint_path.parent / "medusa_heads.safetensors"
    if not os.access(heads_path.parent, os.W_OK):  # before the work, not after it
        raise ValueError(f"cannot write to {heads_path.parent}: choose another --medusa_heads path")
    if args.seq_len > base.config.block_size:
        raise ValueError(f"--seq_len {args.seq_len} exceeds the model's context of {base.config.block_size}")
    windows = calibration_windows(load_tokenizer(args.checkpoint_path.parent), windows_before + args.calibration_samples,
                                  args.seq_len, seed=args.seed, split=args.split)
    return base, heads_path, windows


def train(args):
    """`medusa.py train`: heads on the frozen model, then their tree, saved beside the model."""
    t0 = time.perf_counter()
    train_windows = args.steps * args.batch_size
    base, heads_path, windows = prepare(args, train_windows)
    heads = MedusaHeads(base.config.dim, args.num_heads, args.num_layers).to(args.device)
    base.setup_caches(args.batch_size, args.seq_len)
    batches = training_batches(base, windows[:train_windows], args.data, args.batch_size, args.distill_temperature)
    final = train_heads(base, heads, batches, args.steps, args.lr, args.decay)
    config = dict(num_heads=args.num_heads, num_layers=args.num_layers, dim=base.config.dim,
                  vocab_size=base.config.vocab_size, base=str(args.checkpoint_path),
                  training=dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                decay=args.decay, data=args.data, distill_temperature=args.distill_temperature,
                                final_loss=[round(v, 4) for v in final["loss"]]))
    heads.to(base.tok_embeddings.weight.dtype)
    accuracy = fit_tree(base, heads, windows[train_windows:], config, args)
    save_heads(heads, heads_path, config)
    print(report(heads_path, heads, accuracy, config, args.split, time.perf_counter() - t0))


def calibrate(args):
    """`medusa.py calibrate`: the heads' accuracies on a split; on the train split, their tree is fitted again."""
    t0 = time.perf_counter()
    base, heads_path, windows = prepare(args)
    heads, config = load_heads(heads_path, base)
    accuracy = fit_tree(base, heads, windows, config, args)
    if args.split == "train":
        write_config(heads_path, config)
    print(report(heads_path, heads, accuracy, config, args.split, time.perf_counter() - t0))


def fit_tree(base, heads: MedusaHeads, windows: Tensor, config: dict, args) -> list:
    """Accuracies on the base model's greedy continuations of windows the heads were not trained on. On the train
    split (only: the held-out split is for reporting) the best tree of --nodes goes into config."""
    base.setup_caches(len(windows), args.seq_len)
    accuracy = rank_accuracy(base, heads, self_distill(base, windows, 0.0))
    if args.split == "train":
        config["medusa_choices"], expected = best_tree(accuracy, args.nodes)
        config["expected_tokens_per_step"] = round(expected, 3)
        config["accuracy"] = dict(split="train", top1=[round(a[0], 4) for a in accuracy],
                                  top5=[round(sum(a[:5]), 4) for a in accuracy])
    return accuracy


def report(heads_path, heads, accuracy, config, split: str, seconds: float) -> str:
    choices = load_tree(None, config, len(heads.blocks)).choices
    rows = [("heads", f"{heads_path} ({len(heads.blocks)} heads)"),
            ("top-1 accuracy", " ".join(f"{a[0]:.3f}" for a in accuracy) + f" (heads 1..K, {split} split)"),
            ("top-5 accuracy", " ".join(f"{sum(a[:5]):.3f}" for a in accuracy)),
            ("tree", f"{len(choices)} nodes, depth {max(map(len, choices))}"),
            ("expected tokens/step", f"{expected_length(accuracy, choices):.2f} (heads taken as independent)"),
            ("time", f"{seconds:.0f} s")]
    return "\n".join(f"{name:>20}: {value}" for name, value in rows)


def main(argv=None):
    args = parse_args(argv)
    (train if args.command == "train" else calibrate)(args)


if __name__ == "__main__":
    cli.run(main)
