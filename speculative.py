"""Speculative decoding: a small draft model proposes k tokens, the target checks all of them in one forward, and the
output is exactly what the target alone would sample (Leviathan et al. 2023; Chen et al. 2023).

    python generate.py --draft_checkpoint_path checkpoints/tiny-py-draft/model.pth --speculate_k 4
    python generate.py --checkpoint_path DIR/model.pth --draft_checkpoint_path DIR/model_int4.g32.pth --compile
    python generate.py --checkpoint_path DIR/model_anyprec.3-8.pth --draft_precision 3 --compile   # one model

The draft is any model with the target's vocabulary: a smaller one trained with the same tokenizer, an int4 copy
of the target, or the target's own any-precision weights read at fewer bits (self-speculation: one copy of the
weights in memory, two KV caches).

Notation: p is the target's distribution and q the draft's, both warped the same way (temperature, top-k, top-p, in
fp32, by generate.logits_to_probs). One step, for every row of the batch at once:
  1. the draft proposes d_1..d_k autoregressively, d_i ~ q_i, keeping each q_i;
  2. the target runs once on [cur, d_1..d_k] at the row's own positions, which gives p_1..p_{k+1};
  3. d_i is accepted while u_i * q_i(d_i) < p_i(d_i) (probability min(1, p/q)); at the first rejection, after n
     acceptances, one token is drawn from the residual max(0, p_{n+1} - q_{n+1}), or from p_{k+1} (the bonus) when
     all k were accepted. The step emits n + 1 tokens, and each is distributed exactly as the target's.
At temperature 0 a draft is accepted while it equals the target's argmax, and the target's argmax follows.

The KV caches are indexed and masked by position, so rejected entries need no rollback: the next step overwrites
them before any query can see them. Shapes never change (fixed B and k), so --compile captures three CUDA graphs
(draft [B, 2] and [B, 1], verify [B, k+1]) and never recompiles; each step syncs with the host once, to read n.
"""
import functools
import time

import torch
from torch import Tensor

from generate import (compile_fns as compile_plain, logits_to_probs, prefill, reserve_cache, right_padded, sample_from,
                      sync)
from model import Transformer


# ---------------------------------------------------------------------------------------------------------------
# The acceptance rule: pure functions of the two models' outputs.

def accept(p: Tensor, q: Tensor, draft_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Speculative sampling for k proposals per row.

    p [B, k+1, V]: target probabilities after cur, d_1, .., d_k; q [B, k, V]: the draft probabilities each d_i was
    drawn from; draft_tokens [B, k]. Returns (tokens [B, k+1], n [B]): row b emits tokens[b, :n[b] + 1], its first
    n[b] drafts and then the residual (or bonus) draw; entries past n[b] are meaningless.
    """
    B, k = draft_tokens.shape
    index = draft_tokens[..., None]
    p_d, q_d = p[:, :k].gather(-1, index)[..., 0], q.gather(-1, index)[..., 0]  # [B, k]
    # u < p/q without dividing; q(d) > 0 because d was drawn from q.
    ok = torch.rand_like(q_d) * q_d < p_d
    n = ok.int().cumprod(-1).sum(-1)  # [B] accepted before the first rejection
    rows = torch.arange(B, device=p.device)
    p_n = p[rows, n]  # [B, V]
    q_n = q[rows, n.clamp(max=k - 1)] * (n < k)[:, None]  # q_{k+1} = 0: after k acceptances the residual is p_{k+1}
    residual = (p_n - q_n).clamp(min=0)
    # p == q up to rounding leaves no residual mass (and a rejection there is all but impossible): fall back to p.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    last = sample_from(residual)  # the exponential race needs no normalisation
    tokens = torch.cat([draft_tokens, last[:, None]], 1).scatter(1, n[:, None], last[:, None])
    return tokens, n


def accept_greedy(target_logits: Tensor, draft_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Temperature 0: target_logits [B, k+1, V], draft_tokens [B, k] -> (tokens [B, k+1], n [B]) as in `accept`.

    Accepted drafts equal the target's argmax, so the emitted tokens are the argmax at every position."""
    best = target_logits.argmax(-1)  # [B, k+1]
    n = (best[:, :-1] == draft_tokens).int().cumprod(-1).sum(-1)
    return best, n


# ---------------------------------------------------------------------------------------------------------------
# One speculative step: the two functions that get compiled, and the loop over the draft.

def draft_step(draft: Transformer, tokens, input_pos, temperature: float, top_k, top_p):
    """tokens, input_pos [B, S] -> (next token [B], its distribution q [B, V], or None at temperature 0)."""
    logits = draft.output(draft.hidden(tokens, input_pos)[:, -1])
    if temperature == 0:
        return logits.argmax(-1), None
    q = logits_to_probs(logits, temperature, top_k, top_p)
    return sample_from(q), q


def verify(target: Transformer, cur, draft_tokens, q, pos, temperature: float, top_k, top_p):
    """cur, pos [B]; draft_tokens [B, k]; q [B, k, V] or None -> (tokens [B, k+1], n [B]): one target forward."""
    tokens = torch.cat([cur[:, None], draft_tokens], 1)  # [B, k+1]
    input_pos = pos[:, None] + torch.arange(tokens.shape[1], device=pos.device)
    logits = target(tokens, input_pos)  # [B, k+1, V]
    if temperature == 0:
        return accept_greedy(logits, draft_tokens)
    return accept(logits_to_probs(logits, temperature, top_k, top_p), q, draft_tokens)


def speculative_step(target, draft, prev, cur, pos, k: int, temperature: float, top_k, top_p, *,
                     draft_fn=draft_step, verify_fn=verify):
    """prev, cur, pos [B]: each row's last two tokens and cur's position (cur is in no cache yet).

    The draft's first forward takes [prev, cur]: when the previous step accepted all k drafts, prev never went
    through the draft, so this writes it, and the draft costs k forwards per step, never k + 1.
    Outputs of a compiled call are cloned: the next replay of its CUDA graph overwrites them.
    """
    d, q = draft_fn(draft, torch.stack([prev, cur], 1), torch.stack([pos - 1, pos], 1), temperature, top_k, top_p)
    drafts, qs = [d.clone()], [q if q is None else q.clone()]
    for i in range(1, k):
        d, q = draft_fn(draft, drafts[-1][:, None], (pos + i)[:, None], temperature, top_k, top_p)
        drafts.append(d.clone())
        qs.append(q if q is None else q.clone())
    q = None if temperature == 0 else torch.stack(qs, 1)  # [B, k, V]
    tokens, n = verify_fn(target, cur, torch.stack(drafts, 1), q, pos, temperature, top_k, top_p)
    return tokens.clone(), n.clone()


def compile_fns(compile_decode: bool, compile_prefill: bool):
    """(prefill, step) for `generate`, compiled as asked: the draft and verify functions to CUDA graphs of static
    shapes (one per input shape, so dynamic=False), the target's prefill as generate.py compiles it."""
    prefill_fn, _ = compile_plain(compile_decode, compile_prefill)  # also sets the inductor options
    if not compile_decode:
        return prefill_fn, speculative_step
    options = dict(mode="reduce-overhead", fullgraph=True, dynamic=False)
    return prefill_fn, functools.partial(speculative_step, draft_fn=torch.compile(draft_step, **options),
                                         verify_fn=torch.compile(verify, **options))


# ---------------------------------------------------------------------------------------------------------------
# Generation: generate.generate's interface, with a draft.

def load_draft(target: Transformer, checkpoint_path=None, precision=None, device="cpu", dtype=torch.bfloat16):
    """The draft for `target`: a checkpoint (a smaller model trained with the same tokenizer, or a quantized copy of
    the target), or with `precision` the target's own any-precision weights read at fewer bits (self-speculation:
    no second copy of the weights, only a second KV cache)."""
    if (checkpoint_path is None) == (precision is None):
        raise ValueError("speculative decoding needs one draft: --draft_checkpoint_path, or --draft_precision for an "
                         "any-precision model")
    if precision is not None:
        from anyprec import at_precision
        draft = at_precision(target, precision)
    else:
        from generate import load_model
        draft = load_model(checkpoint_path, device, dtype)
    check_pair(target, draft)
    return draft


def check_pair(target: Transformer, draft: Transformer):
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocab {draft.config.vocab_size} != target vocab {target.config.vocab_size}: "
                         f"use a draft trained with the target's tokenizer")
    if draft is target:
        raise ValueError("the draft must be its own module: two models cannot share one KV cache")


@torch.no_grad()
def generate(target: Transformer, prompts: list[list[int]], max_new_tokens: int, *, draft: Transformer,
             speculate_k: int = 5, temperature=0.0, top_k=None, top_p=None, stop_ids=(), prefill_fn=prefill,
             decode_fn=speculative_step, on_tokens=None):
    """generate.generate's contract (same arguments, same output, exactly the target's distribution), with `draft`
    proposing `speculate_k` tokens per target forward. decode_fn is one speculative step (see compile_fns).

    on_tokens(call, tokens) is called once per output position a step reaches, tokens[b] being row b's token there
    (None where row b has none). stats adds decode_tokens and accepted (accepted[n]: row-steps that kept n drafts).
    """
    check_pair(target, draft)
    k = speculate_k
    if k < 1:
        raise ValueError(f"--speculate_k {k}: propose at least one token")
    device = target.tok_embeddings.weight.device
    B, lengths = len(prompts), [len(p) for p in prompts]
    tokens, input_pos = right_padded(prompts, device)
    # The last step starts before max_new_tokens and writes k + 1 slots: the cache must hold the overshoot.
    for name, model in (("target model", target), ("draft model", draft)):
        reserve_cache(model, B, max(lengths), max_new_tokens + k + 1,
                      f"max_new_tokens ({max_new_tokens}) + speculate_k + 1 ({k + 1})",
                      "lower --max_new_tokens or --speculate_k", name)

    sync(device)
    t0 = time.perf_counter()
    cur = prefill_fn(target, tokens, input_pos, torch.tensor(lengths, device=device) - 1, temperature, top_k, top_p)
    host = cur.tolist()
    ttft = time.perf_counter() - t0
    seqs = [p + [t] for p, t in zip(prompts, host)]  # each row's whole sequence, cut at max_new_tokens or a stop id
    done = [t in stop_ids or max_new_tokens <= 1 for t in host]
    if on_tokens:
        on_tokens(0, host)
    accepted, steps, calls = [0] * (k + 1), 0, 0
    t1 = time.perf_counter()  # decode time includes the draft's prefill
    draft.hidden(tokens, input_pos)  # the draft's cache takes the prompt; its output is not needed
    while not all(done):
        # Every row restarts from the end of its own sequence. A finished row is parked there: it keeps computing
        # (static shapes), but only rewrites its last slots with the same tokens and scribbles past its end.
        state = torch.tensor([[s[-2], s[-1], len(s) - 1] for s in seqs], device=device)  # [B, 3]
        out, n = decode_fn(target, draft, state[:, 0], state[:, 1], state[:, 2], k, temperature, top_k, top_p)
        host = torch.cat([out, n[:, None]], 1).tolist()  # the one host sync of the step
        steps += 1
        new = [[] for _ in range(B)]
        for i, row in enumerate(host):
            if done[i]:
                continue
            accepted[row[-1]] += 1
            for t in row[: row[-1] + 1]:
                new[i].append(t)
                seqs[i].append(t)
                if t in stop_ids or len(seqs[i]) - lengths[i] == max_new_tokens:
                    done[i] = True
                    break
        for j in range(max(map(len, new)) if on_tokens else 0):
            calls += 1
            on_tokens(calls, [r[j] if j < len(r) else None for r in new])
    sync(device)
    decode_time = time.perf_counter() - t1
    results = [s[length:] for s, length in zip(seqs, lengths)]
    decode_tokens = sum(len(row) - 1 for row in results)
    results = [row[:-1] if row[-1] in stop_ids else row for row in results]
    stats = dict(ttft=ttft, decode_steps=steps, decode_time=decode_time, batch_size=B,
                 new_tokens=sum(map(len, results)), decode_tokens=decode_tokens, accepted=accepted)
    return results, stats


def acceptance_summary(accepted: list[int]) -> tuple[float, str]:
    """(mean tokens emitted per target forward, the histogram as 'n: share' for n = 0..k)."""
    total = sum(accepted)
    mean = sum((n + 1) * c for n, c in enumerate(accepted)) / max(total, 1)
    return mean, "  ".join(f"{n}: {c / max(total, 1):.0%}" for n, c in enumerate(accepted))
