import copy

import pytest
import torch

import generate as plain
import speculative
from generate import acceptance_summary, logits_to_probs, sample_from
from model import ModelArgs, Transformer
from speculative import accept, accept_greedy

CONFIG = ModelArgs(block_size=128, vocab_size=512, n_layer=2, n_head=4, n_kv_heads=2, dim=32, intermediate_size=64)


@pytest.fixture
def target():
    torch.manual_seed(1)
    return Transformer(CONFIG).eval()  # default init: varied, confident predictions


def noisy_copy(model, scale=0.02, seed=2):
    """A draft that agrees with the model often but not always: both acceptance and rejection get exercised."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return draft


def generate(target, prompts, max_new_tokens, *, draft, speculate_k=5, temperature=0.0, top_k=None, top_p=None,
             compile=False, **kwargs):
    """The one decode loop with speculative decoding."""
    decoder = speculative.decoder(target, draft, speculate_k, temperature, top_k, top_p, compile=compile)
    return plain.generate(target, prompts, max_new_tokens, decoder=decoder, **kwargs)


def prompts_of(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def tv(counts, probs):
    return 0.5 * (counts.float() / counts.sum() - probs).abs().sum().item()


def chi2_pvalue(counts, probs):
    """Goodness of fit of counts to probs: no sample may fall where probs is 0; bins expecting fewer than 5 samples
    are merged into one."""
    assert counts[probs == 0].sum() == 0, "a sample fell where the exact probability is 0"
    expected = probs.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    return 1 - torch.distributions.Chi2(float(keep.sum() - 1)).cdf(stat.float()).item()


# ---------------------------------------------------------------------------------------------------------------
# The acceptance rule on explicit distributions.

def distribution_pairs(V=8):
    g = torch.Generator().manual_seed(0)
    p, q = torch.rand(V, generator=g) ** 2, torch.rand(V, generator=g) ** 2
    disjoint_p, disjoint_q = torch.zeros(V), torch.zeros(V)
    disjoint_p[:3], disjoint_q[3:] = torch.tensor([0.5, 0.3, 0.2]), 1.0
    top = p.clone()
    top[p.argsort()[:4]] = 0  # the target's top-k keeps 4 tokens; the draft puts mass on the other 4 too
    return {"random": (p, q), "disjoint": (disjoint_p, disjoint_q), "q_where_p_is_0": (top, q), "equal": (p, p)}


@pytest.mark.parametrize("case", ["random", "disjoint", "q_where_p_is_0", "equal"])
def test_accept_emits_exactly_p(case):
    p, q = (x / x.sum() for x in distribution_pairs()[case])
    bonus = torch.linspace(1, 2, 8).softmax(0)
    N = 200_000  # TV's standard error is about 0.003 at this size
    d = sample_from(q.expand(N, 1, -1))  # [N, 1]
    tokens, n = accept(torch.stack([p, bonus]).expand(N, -1, -1), q.expand(N, 1, -1), d)
    assert tv(torch.bincount(tokens[:, 0], minlength=8), p) < 0.01
    assert abs(n.float().mean().item() - torch.minimum(p, q).sum().item()) < 0.01
    if case == "equal":
        assert (n == 1).all()
    if (n == 1).sum() > 10_000:  # all accepted: the bonus token comes from p_{k+1}
        assert tv(torch.bincount(tokens[n == 1, 1], minlength=8), bonus) < 0.02


def test_accept_greedy():
    logits = torch.tensor([[[0.0, 3, 1], [2, 0, 1], [0, 1, 5], [1, 0, 0]]])  # argmax 1, 0, 2, 0
    for drafts, n in [([1, 0, 2], 3), ([1, 0, 1], 2), ([2, 0, 2], 0)]:
        tokens, accepted = accept_greedy(logits, torch.tensor([drafts]))
        assert accepted.item() == n and tokens[0].tolist() == [1, 0, 2, 0]


def speculative_chain(P, Q, k, N, length, accept_fn):
    """N rows of speculative sampling over bigram tables (next-token distribution indexed by the last token),
    started at token 0, until each row has `length` tokens: returns [N, length]."""
    rows = torch.arange(N)
    last, count = torch.zeros(N, dtype=torch.long), torch.zeros(N, dtype=torch.long)
    out = torch.zeros(N, length + k + 1, dtype=torch.long)
    while (count < length).any():
        drafts = [sample_from(Q[last])]
        for _ in range(k - 1):
            drafts.append(sample_from(Q[drafts[-1]]))
        d = torch.stack(drafts, 1)  # [N, k]
        p = torch.stack([P[last]] + [P[x] for x in drafts], 1)  # [N, k+1, V]
        tokens, n = accept_fn(p, Q[torch.cat([last[:, None], d[:, :-1]], 1)], d)
        active = count < length
        for j in range(k + 1):
            take = (j <= n) & active
            out[rows[take], count[take]] = tokens[take, j]
            count += take.long()
        last = tokens[rows, n]
    return out[:, :length]


def resample_from_p(p, q, d):
    """A classic bug: on rejection, draw from p instead of the residual. Biased towards what the draft proposes."""
    tokens, n = accept(p, q, d)
    rows, k = torch.arange(len(n)), d.shape[1]
    fresh = sample_from(p[rows, n])
    return torch.where((torch.arange(k + 1) == n[:, None]) & (n < k)[:, None], fresh[:, None], tokens), n


def test_three_token_joint_over_bigram_tables_is_exact():
    V = 5
    g = torch.Generator().manual_seed(3)
    P = torch.rand(V, V, generator=g) ** 3
    P[:, 1] = 0  # the target never emits 1; the draft proposes it
    Q = torch.rand(V, V, generator=g)
    Q[:, 4] = 0  # the draft never proposes 4; the target emits it
    P, Q = P / P.sum(1, keepdim=True), Q / Q.sum(1, keepdim=True)
    exact = (P[0][:, None, None] * P[:, :, None] * P[None]).flatten()  # P(a|0) P(b|a) P(c|b)
    for accept_fn, exact_ok in [(accept, True), (resample_from_p, False)]:
        torch.manual_seed(0)
        seqs = speculative_chain(P, Q, k=2, N=100_000, length=3, accept_fn=accept_fn)
        counts = torch.bincount(seqs[:, 0] * V * V + seqs[:, 1] * V + seqs[:, 2], minlength=V ** 3)
        pvalue = chi2_pvalue(counts, exact)
        assert pvalue > 1e-3 if exact_ok else pvalue < 1e-9, pvalue  # the test has the power to see the bug


# ---------------------------------------------------------------------------------------------------------------
# End to end on tiny Transformers.

def test_tiny_transformer_joint_of_three_tokens_is_exact():
    """16384 rows of one prompt in one batch; the first token comes from the prefill, the next two from
    speculative steps (k = 2: one step may emit both). Compared with the exact warped joint, enumerated."""
    V, sampling = 8, dict(temperature=0.9, top_k=6, top_p=0.97)
    config = ModelArgs(block_size=16, vocab_size=V, n_layer=2, n_head=2, dim=16, intermediate_size=32)
    torch.manual_seed(5)
    target, draft = Transformer(config).eval(), Transformer(config).eval()
    prompt = [3, 1, 4]
    with torch.no_grad():
        grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # [64, 2]: every (t1, t2)
        seqs = torch.cat([torch.tensor(prompt).expand(V * V, -1), grid], 1)
        probs = logits_to_probs(target(seqs)[:, 2:], **sampling)  # [64, 3, V]: after the prompt, t1, t2
    exact = probs[:, 0].gather(1, grid[:, :1]) * probs[:, 1].gather(1, grid[:, 1:]) * probs[:, 2]  # [64, V]
    out, stats = generate(target, [prompt] * 16384, 3, draft=draft, speculate_k=2, **sampling)
    out = torch.tensor(out)
    counts = torch.bincount(out[:, 0] * V * V + out[:, 1] * V + out[:, 2], minlength=V ** 3)
    assert chi2_pvalue(counts, exact.flatten()) > 1e-3
    assert 0 < stats["accepted"][0] and 0 < stats["accepted"][2]  # rejections and full acceptances both happened


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_greedy_target(target, k):
    draft = noisy_copy(target)
    small = Transformer(ModelArgs(**{**CONFIG.__dict__, "dim": 16, "n_head": 2, "n_kv_heads": 1})).eval()
    for prompts in [prompts_of([7]), prompts_of([3, 11, 6], seed=1)]:
        expected, _ = plain.generate(target, prompts, 24)
        for d in (draft, small):
            out, stats = generate(target, prompts, 24, draft=d, speculate_k=k)
            assert out == expected
            if d is draft:  # some drafts accepted, some rejected
                assert stats["decode_steps"] < 23 and stats["accepted"][0] > 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_draft_equal_to_target_accepts_everything(target, temperature):
    k = 4
    out, stats = generate(target, prompts_of([5, 9]), 21, draft=copy.deepcopy(target), speculate_k=k,
                          temperature=temperature, top_k=50)
    assert stats["accepted"] == [0] * k + [2 * 4] and stats["decode_steps"] == 4  # 2 rows, 21 = 1 + 4 * (k + 1)
    assert acceptance_summary(stats["accepted"])[0] == k + 1
    assert [len(row) for row in out] == [21, 21]


def test_caches_equal_a_fresh_prefill_of_the_final_sequence(target):
    """Rejected entries are never cleaned up; they must be overwritten before anyone reads them."""
    draft = noisy_copy(target)
    fresh_target, fresh_draft = copy.deepcopy(target), copy.deepcopy(draft)
    prompts = prompts_of([4, 12, 7], seed=3)
    out, stats = generate(target, prompts, 17, draft=draft, speculate_k=3, temperature=0.8)
    assert 0 < stats["accepted"][0] < stats["decode_steps"] * 3
    for b, (prompt, row) in enumerate(zip(prompts, out)):
        seq = torch.tensor([prompt + row])
        N = seq.shape[1]
        # The target holds all but the last token; the draft all but the last two (its next step writes them).
        for model, fresh, held in [(target, fresh_target, N - 1), (draft, fresh_draft, N - 2)]:
            fresh.setup_caches(1, N)
            with torch.no_grad():
                fresh.hidden(seq, torch.arange(N))
            for layer, fresh_layer in zip(model.layers, fresh.layers):
                for name in ("k_cache", "v_cache"):
                    got = getattr(layer.attention.kv_cache, name)[b, :, :held]
                    want = getattr(fresh_layer.attention.kv_cache, name)[0, :, :held]
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 10, 11])
def test_exact_length_when_blocks_overshoot(target, max_new_tokens):
    prompts = prompts_of([6])
    expected, _ = plain.generate(target, prompts, max_new_tokens)
    out, stats = generate(target, prompts, max_new_tokens, draft=copy.deepcopy(target), speculate_k=3)
    assert out == expected and len(out[0]) == max_new_tokens
    assert stats["decode_steps"] == -(-(max_new_tokens - 1) // 4)  # 4 tokens per step, the last block cut


def test_stop_id_mid_block_truncates(target):
    prompts = prompts_of([6], seed=4)
    full, _ = plain.generate(target, prompts, 30)
    full = full[0]
    # Steps emit tokens 1-4, 5-8, ...: take a stop token in the middle of a block, not seen before it.
    j = next(j for j in range(5, 30) if j % 4 != 0 and full[j] not in full[:j])
    out, stats = generate(target, prompts, 30, draft=copy.deepcopy(target), speculate_k=3, stop_ids={full[j]})
    assert out[0] == full[:j] and stats["decode_steps"] == -(-j // 4)


def test_rows_stop_and_park_without_leaving_the_cache(target):
    """The smallest cache that fits (prompt + max_new_tokens + k + 1 = block_size): rows finish at different
    steps, keep computing while parked, and every write stays inside."""
    prompts = prompts_of([10, 3], seed=5)
    k, max_new = 3, CONFIG.block_size - 10 - 4
    full, _ = plain.generate(target, prompts, max_new)
    stop = next(t for t in full[0][5:] if t not in full[1])  # row 0 stops early, row 1 runs to max_new
    expected, _ = plain.generate(target, prompts, max_new, stop_ids={stop})
    out, _ = generate(target, prompts, max_new, draft=noisy_copy(target), speculate_k=k, stop_ids={stop})
    assert out == expected and len(out[0]) < 30 and len(out[1]) == max_new


def test_clear_errors(target):
    other = Transformer(ModelArgs(**{**CONFIG.__dict__, "vocab_size": 256}))
    with pytest.raises(ValueError, match="draft vocab 256 != target vocab 512"):
        generate(target, prompts_of([4]), 8, draft=other)
    with pytest.raises(ValueError, match=r"\+ 5 slots a step may write ahead exceeds the model's context of 128"):
        generate(target, prompts_of([10]), 128 - 10 - 4, draft=noisy_copy(target), speculate_k=4)
    with pytest.raises(ValueError, match="--speculate_k 0"):
        generate(target, prompts_of([4]), 8, draft=noisy_copy(target), speculate_k=0)


def test_streaming_gets_every_token_once(target):
    seen = []
    out, _ = generate(target, prompts_of([5]), 15, draft=noisy_copy(target), speculate_k=3,
                      on_tokens=lambda new: seen.extend(new[0]))
    assert seen == out[0]


def test_compiled_steps_never_recompile(target):
    """Three graphs (draft [B, 2] and [B, 1], verify [B, k+1]) per sampling setting; other prompts, lengths and
    accepted counts reuse them."""
    torch._dynamo.reset()
    draft = noisy_copy(target)
    target.setup_caches(2, 64)
    draft.setup_caches(2, 64)
    eager, _ = generate(target, prompts_of([5, 9]), 12, draft=draft, speculate_k=3)
    compiled, _ = generate(target, prompts_of([5, 9]), 12, draft=draft, speculate_k=3, compile=True)
    assert compiled == eager
    generate(target, prompts_of([5, 9]), 4, draft=draft, speculate_k=3, temperature=0.8, top_k=50, compile=True)
    with torch.compiler.set_stance("fail_on_recompile"):
        generate(target, prompts_of([13, 2], seed=1), 20, draft=draft, speculate_k=3, compile=True)
        generate(target, prompts_of([7, 30], seed=2), 20, draft=draft, speculate_k=3, temperature=0.8, top_k=50,
                 compile=True)


# ---------------------------------------------------------------------------------------------------------------
# Command lines: generate.py with a draft, bench.py --speculative.

@pytest.fixture
def checkpoints(tmp_path, target, sp_model_file):
    """A target and a draft (a noisy copy) saved as checkpoints with config and tokenizer."""
    import shutil
    paths = []
    for name, model in [("target", target), ("draft", noisy_copy(target))]:
        (tmp_path / name).mkdir()
        torch.save(model.state_dict(), tmp_path / name / "model.pth")
        model.config.save(tmp_path / name / "config.json")
        shutil.copy(sp_model_file, tmp_path / name / "tokenizer.model")
        paths.append(tmp_path / name / "model.pth")
    return paths


def run_generate(*args):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "generate.py"
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True)


def test_cli_speculates_and_summarises(checkpoints):
    target_path, draft_path = checkpoints
    r = run_generate("--checkpoint_path", target_path, "--draft_checkpoint_path", draft_path, "--speculate_k", 3,
                     "--max_new_tokens", 20, "--device", "cpu", "--temperature", 0)
    assert r.returncode == 0, r.stderr
    for field in ["tok/s", "tokens per forward", "proposals accepted", "0: ", "3: "]:
        assert field in r.stdout


def test_cli_vocab_mismatch_fails_before_any_work(checkpoints):
    target_path, draft_path = checkpoints
    other = Transformer(ModelArgs(**{**CONFIG.__dict__, "vocab_size": 256}))
    torch.save(other.state_dict(), draft_path)
    other.config.save(draft_path.parent / "config.json")
    with pytest.raises(ValueError, match="draft vocab 256 != target vocab 512: use a draft trained with the target"):
        plain.main(["--checkpoint_path", str(target_path), "--draft_checkpoint_path", str(draft_path), "--device",
                    "cpu"])


def test_bench_compares_plain_and_speculative(checkpoints, capsys):
    import bench
    target_path, draft_path = checkpoints
    bench.main(["speculative", "--checkpoint_path", str(target_path), "--draft_checkpoint_path", str(draft_path),
                "--speculate_k", "3", "--max_new_tokens", "12", "--runs", "1", "--device", "cpu", "--dtype", "float32"])
    out = capsys.readouterr().out
    for field in ["plain tok/s", "spec. tok/s", "tokens/fwd", "draft drafts", "int4 g32 copy drafts", "x  "]:
        assert field in out


@pytest.mark.cuda
def test_cuda_graphs_replay_the_eager_result(target):
    """On the GPU, compiled steps are CUDA graphs whose outputs are overwritten by the next replay: what the loop
    keeps must be copies. fp32, so greedy output is the target's own."""
    torch._dynamo.reset()
    target = target.cuda()
    draft = noisy_copy(target)
    prompts = prompts_of([5, 9, 3])
    target.setup_caches(3, 64)
    draft.setup_caches(3, 64)
    expected, _ = plain.generate(target, prompts, 40)
    for _ in range(3):  # capture, then replays
        out, stats = generate(target, prompts, 40, draft=draft, speculate_k=4, compile=True)
        assert out == expected and 0 < stats["accepted"][0]
    generate(target, prompts, 40, draft=draft, speculate_k=4, temperature=0.8, top_k=50, compile=True)
    with torch.compiler.set_stance("fail_on_recompile"):
        generate(target, prompts_of([7, 2, 11], seed=1), 40, draft=draft, speculate_k=4, temperature=0.8, top_k=50,
                 compile=True)


def test_int4_copy_drafts_for_its_full_precision_self(checkpoints, target):
    import quantize
    int4_path = quantize.main(["--checkpoint_path", str(checkpoints[0]), "--mode", "int4", "--groupsize", "32",
                               "--device", "cpu"])
    assert int4_path.name == "model_int4.g32.pth"
    draft = plain.load_model(int4_path, "cpu", torch.float32)
    prompts = prompts_of([5, 12, 8])
    expected, _ = plain.generate(target, prompts, 30)
    out, stats = generate(target, prompts, 30, draft=draft, speculate_k=4)
    assert out == expected
    assert acceptance_summary(stats["accepted"])[0] > 3  # the copy agrees with its original most of the time


def test_self_speculation_from_one_any_precision_model(tmp_path, target, sp_model_file, capsys):
    """The 3-bit view of an any-precision model drafts for its 8-bit self: one copy of the file's weights (planes and
    tables), two caches; on CPU each width in use also holds its dequantised weight (anyprec.CPU_DTYPE)."""
    import shutil
    import anyprec
    from model import linear_names
    fisher = {name: torch.rand(target.get_submodule(name).weight.shape) for name in linear_names(target, False)}
    state, _ = anyprec.quantize_state(target.state_dict(), fisher, seed_bits=3, parent_bits=8, progress=False)
    torch.save(state, tmp_path / "model_anyprec.3-8.pth")
    CONFIG.save(tmp_path / "config.json")
    model = plain.load_model(tmp_path / "model_anyprec.3-8.pth", "cpu", torch.float32)  # runs at 8 bits
    draft = anyprec.at_precision(model, 3)
    def storage(m):
        return {t.data_ptr() for t in m.state_dict().values() if t.numel()}
    assert storage(draft) == storage(model)
    prompts = prompts_of([5, 12, 8])
    expected, _ = plain.generate(model, prompts, 30)
    out, stats = generate(model, prompts, 30, draft=draft, speculate_k=4)
    assert out == expected
    assert acceptance_summary(stats["accepted"])[0] > 3  # 3 bits agree with 8 bits most of the time
    assert not {layer.attention.kv_cache.k_cache.data_ptr() for layer in model.layers} & {
        layer.attention.kv_cache.k_cache.data_ptr() for layer in draft.layers}
    shutil.copy(sp_model_file, tmp_path / "tokenizer.model")
    plain.main(["--checkpoint_path", str(tmp_path / "model_anyprec.3-8.pth"), "--draft_precision", "3",
                "--speculate_k", "4", "--max_new_tokens", "20", "--device", "cpu", "--temperature", "0"])
    assert "tokens per forward" in capsys.readouterr().out
    with pytest.raises(ValueError, match="one draft"):
        plain.main(["--checkpoint_path", str(tmp_path / "model_anyprec.3-8.pth"), "--draft_precision", "3",
                    "--draft_checkpoint_path", str(tmp_path / "model_anyprec.3-8.pth"), "--device", "cpu"])


def test_trained_tiny_draft_speeds_up_its_target():
    """The shipped pair on held-out text: the target's own greedy output, in a fraction of its forwards."""
    from eval import stdlib_texts
    from tokenizer import load_tokenizer
    folder = plain.DEFAULT_CHECKPOINT.parent
    target = plain.load_model(folder / "model.pth", "cpu", torch.float32)
    draft = plain.load_model(folder.parent / "tiny-py-draft" / "model.pth", "cpu", torch.float32)
    tokenizer = load_tokenizer(folder)
    prompts = [tokenizer.encode(text, bos=True)[:24] for text in stdlib_texts("heldout")[:4]]
    expected, _ = plain.generate(target, prompts, 64)
    out, stats = generate(target, prompts, 64, draft=draft, speculate_k=4)
    assert out == expected
    assert acceptance_summary(stats["accepted"])[0] > 1.5  # a draft that guessed at random would give about 1
