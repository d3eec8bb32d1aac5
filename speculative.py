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

Needs model.py, anyprec.py (self-speculation) and generate.py, whose loop runs the `decoder` made here.
"""
import torch
from torch import Tensor

from anyprec import at_precision
from generate import Decoder, compile_prefill, compile_step, load_model, logits_to_probs, prefill, sample_from
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


def verify_drafts(target: Transformer, cur, draft_tokens, q, pos, temperature: float, top_k, top_p):
    """cur, pos [B]; draft_tokens [B, k]; q [B, k, V] or None -> (tokens [B, k+1], n [B]): one target forward."""
    tokens = torch.cat([cur[:, None], draft_tokens], 1)  # [B, k+1]
    input_pos = pos[:, None] + torch.arange(tokens.shape[1], device=pos.device)
    logits = target(tokens, input_pos)  # [B, k+1, V]
    if temperature == 0:
        return accept_greedy(logits, draft_tokens)
    return accept(logits_to_probs(logits, temperature, top_k, top_p), q, draft_tokens)


def speculative_step(target, draft, prev, cur, pos, k: int, temperature: float, top_k, top_p, *,
                     draft_fn=draft_step, verify_fn=verify_drafts):
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


def decoder(target: Transformer, draft: Transformer, speculate_k: int = 5, temperature=0.0, top_k=None, top_p=None,
            compile=False, compile_prefill_too=False) -> Decoder:
    """Speculative decoding for generate.generate: each step emits 1 to k + 1 tokens, exactly the target's
    distribution. State: each row's last two tokens and the position of the last (prev, cur, pos [B]).
    With compile, the draft and verify functions become CUDA graphs of static shapes (one per input shape)."""
    check_pair(target, draft)
    if speculate_k < 1:
        raise ValueError(f"--speculate_k {speculate_k}: propose at least one token")
    prefill_fn = compile_prefill(prefill) if compile_prefill_too else prefill
    draft_fn, verify_fn = draft_step, verify_drafts
    if compile:
        draft_fn, verify_fn = compile_step(draft_step), compile_step(verify_drafts)
    sampling = (temperature, top_k, top_p)

    def first(tokens, input_pos, last):
        cur = prefill_fn(target, tokens, input_pos, last, *sampling).clone()
        draft.hidden(tokens, input_pos)  # the draft's cache takes the prompt; its output is not needed
        prev = tokens.gather(1, last[:, None])[:, 0]
        return cur[:, None], torch.ones_like(cur), (prev, cur, last + 1)

    def step(state, active):
        prev, cur, pos = state
        # A finished row computes on (static shapes) from the end of its cache: its writes land past its sequence,
        # which they leave intact, and inside the cache. A running row is never that far.
        pos = pos.clamp(max=min(target.max_seq_length, draft.max_seq_length) - speculate_k - 1)
        tokens, n = speculative_step(target, draft, prev, cur, pos, speculate_k, *sampling, draft_fn=draft_fn,
                                     verify_fn=verify_fn)
        # The row's new last two tokens: the last emitted, and the one before it (cur if only one was emitted).
        last = tokens.gather(1, n[:, None])[:, 0]
        before = torch.where(n > 0, tokens.gather(1, (n - 1).clamp(min=0)[:, None])[:, 0], cur)
        return tokens, n + 1, (before, last, pos + n + 1)

    return Decoder(first, step, (target, draft), lookahead=speculate_k + 1)


def load_draft(target: Transformer, checkpoint_path=None, precision=None, device="cpu", dtype=torch.bfloat16):
    """The draft for `target`: a checkpoint (a smaller model trained with the same tokenizer, or a quantized copy of
    the target), or with `precision` the target's own any-precision weights read at fewer bits (self-speculation:
    no second copy of the weights, only a second KV cache)."""
    if (checkpoint_path is None) == (precision is None):
        raise ValueError("speculative decoding needs one draft: --draft_checkpoint_path, or --draft_precision for an "
                         "any-precision model")
    draft = at_precision(target, precision) if precision is not None else load_model(checkpoint_path, device, dtype)
    check_pair(target, draft)
    return draft


def check_pair(target: Transformer, draft: Transformer):
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocab {draft.config.vocab_size} != target vocab {target.config.vocab_size}: "
                         f"use a draft trained with the target's tokenizer")
    if draft is target:
        raise ValueError("the draft must be its own module: two models cannot share one KV cache")
