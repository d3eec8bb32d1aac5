import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import medusa
from generate import generate, load_model, logits_to_probs
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "checkpoints/tiny-py/model.pth"
TINY_HEADS = TINY.parent / "medusa_heads.safetensors"
CONFIG = ModelArgs(block_size=128, vocab_size=64, n_layer=2, n_head=4, n_kv_heads=2, dim=32, intermediate_size=64)
# Every rank in {0, 1, 2} to depth 2, and three paths to depth 3.
TERNARY = [[a] for a in range(3)] + [[a, b] for a in range(3) for b in range(3)] + [[0, 0, 0], [0, 1, 2], [2, 2, 2]]


def tokens_per_step(stats):
    return sum((n + 1) * c for n, c in enumerate(stats["accepted"])) / sum(stats["accepted"])


def medusa_generate(model, prompts, max_new_tokens, *, heads, tree, temperature=0.0, top_k=None, top_p=None,
                    compile=False, **kwargs):
    """The one decode loop with Medusa decoding."""
    decoder = medusa.decoder(model, heads, tree, temperature, top_k, top_p, compile=compile)
    return generate(model, prompts, max_new_tokens, decoder=decoder, **kwargs)


def random_model(config=CONFIG, seed=1):
    torch.manual_seed(seed)
    return Transformer(config).eval()  # default init: varied, confident predictions


def random_heads(dim, num_heads, seed=2):
    torch.manual_seed(seed)
    heads = medusa.MedusaHeads(dim, num_heads)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return heads


def prompts_of(lengths, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def right_padded(prompts):
    tokens = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, torch.tensor([len(p) for p in prompts])


# M1 -------------------------------------------------------------------------------------------------------------

def test_tree_buffers_of_a_hand_made_tree():
    tree = medusa.build_tree([[1], [0], [0, 0], [0, 1], [1, 0], [0, 0, 0]], num_heads=3)
    # nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [0,1], 5 [1,0], 6 [0,0,0]; pool: root, head 1 top-2, head 2, head 3
    assert tree.parent.tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.src.tolist() == [0, 1, 2, 3, 4, 3, 5]
    assert tree.anc.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1], [0, 2, 2, 2], [0, 1, 3, 3], [0, 1, 4, 4], [0, 2, 5, 5],
                                 [0, 1, 3, 6]]
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for i, row in enumerate(tree.anc.tolist()):
        expected[i, row] = True
    assert torch.equal(tree.tmask, expected) and (tree.num_heads, tree.top) == (3, 2)


def test_mc_sim_7b_63():
    tree = medusa.build_tree(medusa.MC_SIM_7B_63, num_heads=4)
    T = tree.parent.numel()
    assert T == 64 and tree.num_heads == 4 and tree.top == 10
    assert torch.bincount(tree.depth).tolist() == [1, 10, 28, 23, 2]
    assert T - len(set(tree.parent[1:].tolist())) == 42  # leaves


@pytest.mark.parametrize("choices, heads, message", [
    ([[0], [1], [0]], 3, r"lists \[0\] twice"),
    ([[0], [0, 1, 0]], 3, r"not prefix-closed: \[0, 1, 0\] .* parent \[0, 1\]"),
    ([[0], [0, 0], [0, 0, 0]], 2, "3 deep but there are 2 heads"),
    ([[0], []], 3, "non-empty list of ranks"),
    ([[0], [-1]], 3, "ranks >= 0"),
    ([], 3, "non-empty"),
])
def test_tree_errors_are_one_clear_line(choices, heads, message):
    with pytest.raises(ValueError, match=message):
        medusa.build_tree(choices, heads)


def test_best_tree_is_greedy_by_expected_length():
    accuracy = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.05]]
    choices, expected = medusa.best_tree(accuracy, nodes=4)
    # [0] 0.6, then [0, 0] 0.6*0.5, [1] 0.2, then [0, 1] 0.6*0.2 = 0.12 beats [2] and [1, 0] (0.1 each)
    assert choices == [[0], [0, 0], [1], [0, 1]]
    assert expected == pytest.approx(1 + 0.6 + 0.3 + 0.2 + 0.12)
    medusa.build_tree(medusa.best_tree(accuracy, nodes=9)[0], num_heads=2)  # prefix-closed at every size


# M2 -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sliding_window", [None, 6])
def test_tree_attention_equals_a_causal_forward_of_each_path(sliding_window):
    model = random_model(ModelArgs(**{**CONFIG.__dict__, "sliding_window": sliding_window}))
    reference = copy.deepcopy(model)  # no cache: a plain causal pass
    tree = medusa.build_tree(TERNARY, num_heads=3)
    prompts = prompts_of([5, 9])
    tokens, L = right_padded(prompts)
    model.setup_caches(2, 48)
    model.hidden(tokens, torch.arange(tokens.shape[1]))  # prefill; row 0's padding is in slots 5..8
    nodes = torch.randint(0, 64, (2, tree.parent.numel()))
    logits = model.output(medusa.tree_hidden(model, tree, nodes, L))
    for b in range(2):
        for i in range(tree.parent.numel()):
            path = tree.anc[i, : tree.depth[i] + 1]
            expected = reference(torch.tensor([prompts[b] + nodes[b, path].tolist()]))[0, -1]
            torch.testing.assert_close(logits[b, i], expected, atol=1e-5, rtol=1e-5)


# M3, M4 ---------------------------------------------------------------------------------------------------------

def test_every_accepted_length_and_the_cache_after_each_step():
    """An oracle puts the true greedy continuation at a random rank per depth (or leaves it out): the step must
    accept exactly the longest path that the tree holds, emit it, and leave the cache equal to a fresh prefill."""
    model = random_model()
    fresh = copy.deepcopy(model)
    prompts = prompts_of([4, 10])
    continuation = [generate(copy.deepcopy(model), [p], 60, temperature=0.0)[0][0] for p in prompts]
    tree = medusa.build_tree(TERNARY, num_heads=3)
    heads = random_heads(CONFIG.dim, 3)
    model.setup_caches(2, 96)
    tokens, L = right_padded(prompts)
    greedy = (0.0, None, None, None)
    pool = medusa.medusa_prefill(model, heads, tree, tokens, torch.arange(10).expand(2, -1), L - 1, *greedy)
    emitted = [1, 1]
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(12):
        ranks = torch.randint(0, 4, (2, 3), generator=g).tolist()  # rank 3: not among the candidates
        for b in range(2):
            assert pool[b, 0] == continuation[b][emitted[b] - 1]  # the root: the last emitted token
            for d in range(3):
                truth = continuation[b][emitted[b] + d]
                pool[b, 1 + 3 * d: 4 + 3 * d] = torch.tensor([truth if r == ranks[b][d] else (truth + 1 + r) % 64
                                                              for r in range(3)])
        pool, next_L, out = medusa.medusa_step(model, heads, tree, pool, L, torch.tensor([True, True]), *greedy)
        for b in range(2):
            n = max(j for j in range(4) if j == 0 or ranks[b][:j] in tree.choices)
            seen.add(n)
            assert out[b, -1] == n + 1 and next_L[b] == L[b] + n + 1
            assert out[b, : n + 1].tolist() == continuation[b][emitted[b]: emitted[b] + n + 1]
            emitted[b] += n + 1
            # The cache holds the prompt and every emitted token but the last, which is the next root.
            sequence = torch.tensor([prompts[b] + continuation[b][: emitted[b] - 1]])
            fresh.setup_caches(1, 96)
            fresh.hidden(sequence, torch.arange(sequence.shape[1]))
            for ours, theirs in zip(model.layers, fresh.layers):
                for name in ("k_cache", "v_cache"):
                    torch.testing.assert_close(getattr(ours.attention.kv_cache, name)[b, :, : next_L[b]],
                                               getattr(theirs.attention.kv_cache, name)[0, :, : next_L[b]],
                                               atol=1e-5, rtol=1e-5)
        L = next_L
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("random", [False, True], ids=["zero-init heads", "random heads"])
def test_greedy_output_is_the_plain_greedy_output(random):
    model = random_model()
    heads = random_heads(CONFIG.dim, 3) if random else medusa.MedusaHeads(CONFIG.dim, 3)
    prompts = prompts_of([3, 11, 6])
    plain, _ = generate(copy.deepcopy(model), prompts, 40, temperature=0.0)
    ours, stats = medusa_generate(model, prompts, 40, heads=heads, tree=medusa.build_tree(TERNARY, 3))
    assert ours == plain and stats["new_tokens"] == 120
    stop = plain[1][7]
    cut, _ = medusa_generate(model, prompts, 40, heads=heads, tree=medusa.build_tree(TERNARY, 3), stop_ids={stop})
    assert cut == [row[: row.index(stop)] if stop in row else row for row in plain]


def heldout_prompts(tokenizer, count=8, length=48):
    """A window from the middle of `count` held-out stdlib files, spread over the split."""
    from eval import stdlib_texts
    texts = stdlib_texts("heldout")
    prompts = []
    for i in range(count):
        ids = tokenizer.encode(texts[i * len(texts) // count], bos=False)
        prompts.append(ids[len(ids) // 2: len(ids) // 2 + length])
    return prompts


def test_trained_heads_are_exact_and_accept_at_least_two_tokens_per_step():
    from tokenizer import load_tokenizer
    model = load_model(TINY, "cpu", torch.float32)
    prompts = heldout_prompts(load_tokenizer(TINY.parent))
    plain, _ = generate(model, prompts, 64, temperature=0.0)
    # Rows end at different steps, some past max_new_tokens, while the cache is exactly as long as generate needs.
    heads, tree = medusa.load(TINY_HEADS, model)
    ours, stats = medusa_generate(model, prompts, 64, heads=heads, tree=tree)
    assert ours == plain
    assert tokens_per_step(stats) >= 2.0, stats


# M5 -------------------------------------------------------------------------------------------------------------

def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Goodness of fit, cells with expected count < 5 merged into one."""
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic.double() / 2).item()


def test_sampling_draws_exactly_from_the_base_model():
    """The joint of the first three tokens (4096 cells), enumerated exactly, against 8192 Medusa samples. Head 1
    proposes every token, so a step always accepts one and sometimes two; its head-2 guesses are random."""
    config = ModelArgs(block_size=64, vocab_size=16, n_layer=2, n_head=2, n_kv_heads=1, dim=32, intermediate_size=64)
    model = random_model(config, seed=3)
    with torch.no_grad():
        model.output.weight.mul_(4)  # peaked distributions: fewer cells carry the mass
    prompt, sampling = [3, 7, 1], dict(temperature=0.9, top_k=8)
    with torch.no_grad():
        p1 = logits_to_probs(model(torch.tensor([prompt]))[0, -1], **sampling)  # [16]
        p2 = logits_to_probs(model(torch.tensor([prompt + [a] for a in range(16)]))[:, -1], **sampling)  # [16, 16]
        p3 = logits_to_probs(model(torch.tensor([prompt + [a, b] for a in range(16) for b in range(16)]))[:, -1],
                             **sampling)  # [256, 16]
    joint = (p1[:, None, None] * p2[:, :, None] * p3.view(16, 16, 16)).flatten().double()
    tree = medusa.build_tree([[r] for r in range(16)] + [[r, s] for r in range(16) for s in range(2)], num_heads=2)
    N = 8192
    rows, stats = medusa_generate(model, [prompt] * N, 3, heads=random_heads(32, 2), tree=tree, **sampling)
    assert stats["decode_steps"] == 1 and stats["accepted"][0] == 0 and stats["accepted"][2] > 500
    cells = torch.tensor([256 * a + 16 * b + c for a, b, c in rows])
    observed = torch.bincount(cells, minlength=4096).double()
    assert chi_square_p_value(observed, N * joint) > 1e-3


# M6 -------------------------------------------------------------------------------------------------------------

TYPICAL = medusa.TYPICAL  # the paper's epsilon and delta


def typical_case(root_probs, child_probs):
    """Tree root -> [0] (token 1), [1] (token 2); [0] -> [0, 0] (token 3). Returns (last, after) of choose()."""
    tree = medusa.build_tree([[0], [1], [0, 0]], num_heads=2)
    tokens = torch.tensor([[0, 1, 2, 3]])
    logits = torch.tensor([root_probs, child_probs, [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]).log()[None]
    last, after = medusa.choose(tree, tokens, logits, 1.0, typical=TYPICAL)
    return last.item(), after.item()


def test_typical_acceptance():
    # Depth 1: both children clear min(eps, delta e^-H) = 0.09; depth 2: [0, 0] has 0.95 under [0]: longest wins.
    assert typical_case([0.5, 0.3, 0.15, 0.05], [0.02, 0.02, 0.01, 0.95]) == (3, 0)
    # [0, 0] below the threshold: the two depth-1 paths tie on length, the likelier one wins, then its argmax.
    assert typical_case([0.5, 0.3, 0.15, 0.05], [0.45, 0.45, 0.05, 0.05]) == (1, 0)
    assert typical_case([0.5, 0.15, 0.3, 0.05], [0.45, 0.45, 0.05, 0.05]) == (2, 3)
    # [0] rejected (0.05): its child does not count even though it clears the threshold.
    assert typical_case([0.5, 0.05, 0.4, 0.05], [0.02, 0.02, 0.01, 0.95]) == (2, 3)
    # High entropy: the threshold is delta e^-H (0.3 e^-H < 0.09), so 0.085 passes, which eps alone would reject.
    root = torch.tensor([0.3, 0.085, 0.3, 0.315])
    assert 0.3 * torch.exp(-(-(root * root.log()).sum())) < 0.085 < TYPICAL[0]
    assert typical_case(root.tolist(), [0.02, 0.02, 0.01, 0.95]) == (3, 0)


def test_typical_acceptance_at_low_temperature_is_greedy():
    tree = medusa.build_tree(TERNARY, num_heads=3)
    logits = torch.randn(64, tree.parent.numel(), 5) * 3
    tokens = torch.randint(0, 5, (64, tree.parent.numel()))
    tokens[:, 1:] = torch.where(torch.rand(64, tree.parent.numel() - 1) < 0.5, logits.argmax(-1)[:, tree.parent[1:]],
                                tokens[:, 1:])  # accept about half the nodes, so that paths of every length occur
    greedy = medusa.choose(tree, tokens, logits, 0.0)
    typical = medusa.choose(tree, tokens, logits, 1e-3, typical=TYPICAL)
    assert torch.equal(greedy[0], typical[0]) and torch.equal(greedy[1], typical[1])
    assert tree.depth[greedy[0]].unique().numel() == 4


# M7 -------------------------------------------------------------------------------------------------------------

def test_heads_start_as_the_base_prediction_and_share_no_weights():
    heads = medusa.MedusaHeads(32, 4, num_layers=2)
    output = torch.nn.Linear(32, 64, bias=False)
    h = torch.randn(3, 5, 32)
    logits = heads(h, output)  # [3, 5, 4, 64]
    assert logits.shape == (3, 5, 4, 64)
    for k in range(4):
        assert torch.equal(logits[..., k, :], output(h)) and torch.equal(heads.head(k, h, output), output(h))
    pointers = [p.data_ptr() for p in heads.parameters()]
    assert len(pointers) == len(set(pointers)) == 4 * 2 * 2


def test_heads_round_trip_and_the_reference_layout(tmp_path):
    model = random_model()
    heads = random_heads(CONFIG.dim, 3)
    medusa.save_heads(heads, tmp_path / "h.safetensors", {"medusa_choices": [[0], [1], [0, 0]]})
    loaded, config = medusa.load_heads(tmp_path / "h.safetensors", model)
    h = torch.randn(2, CONFIG.dim)
    torch.testing.assert_close(loaded(h, model.output), heads.to(torch.bfloat16).float()(h, model.output))
    assert medusa.load(tmp_path / "h.safetensors", model)[1].choices == [[0], [1], [0, 0]]
    # FasterDecoding/Medusa v1: `{k}.{layer}.linear.*` blocks and each head's own projection `{k}.{layers}.weight`.
    reference = {}
    for k in range(3):
        reference |= {f"{k}.0.linear.weight": torch.randn(32, 32) / 8, f"{k}.0.linear.bias": torch.randn(32) / 8,
                      f"{k}.1.weight": torch.randn(64, 32)}
    torch.save(reference, tmp_path / "medusa_lm_head.pt")
    loaded, config = medusa.load_heads(tmp_path / "medusa_lm_head.pt", model)
    assert config == {} and loaded.proj is not None
    for k in range(3):
        block = h + F.silu(h @ reference[f"{k}.0.linear.weight"].T + reference[f"{k}.0.linear.bias"])
        torch.testing.assert_close(loaded(h, model.output)[:, k], block @ reference[f"{k}.1.weight"].T)
    with pytest.raises(ValueError, match="3 heads"):  # the default tree, mc_sim_7b_63, is 4 deep
        medusa.load(tmp_path / "medusa_lm_head.pt", model)
    with pytest.raises(FileNotFoundError, match="medusa.py train"):
        medusa.load_heads(tmp_path / "nope.safetensors", model)
    medusa.save_heads(medusa.MedusaHeads(48, 2), tmp_path / "wide.safetensors", {})
    with pytest.raises(ValueError, match="another model"):
        medusa.load_heads(tmp_path / "wide.safetensors", model)


# M8 -------------------------------------------------------------------------------------------------------------

def test_a_repeating_pattern_drives_every_head_above_90_percent():
    """Head k must predict token t+k+1: with a cycle of 8 distinct tokens, any other shift scores near 0."""
    config = ModelArgs(block_size=64, vocab_size=32, n_layer=2, n_head=4, n_kv_heads=2, dim=64, intermediate_size=128)
    base = random_model(config).requires_grad_(False)
    cycle = torch.randperm(32)[:8]

    def batches():
        while True:
            yield cycle[(torch.randint(0, 8, (16, 1)) + torch.arange(48)) % 8]

    heads = medusa.MedusaHeads(64, 3)
    medusa.train_heads(base, heads, batches(), steps=200, lr=1e-2, progress=False)
    x = next(batches())
    with torch.no_grad():
        h = base.hidden(x)
        for k in range(3):
            top1 = (heads.head(k, h[:, : -(k + 2)], base.output).argmax(-1) == x[:, k + 2:]).float().mean()
            assert top1 > 0.9, (k, top1)


# M9 -------------------------------------------------------------------------------------------------------------

def test_generate_cli_streams_the_plain_greedy_text(capsys):
    import generate as generate_module
    argv = ["--checkpoint_path", str(TINY), "--temperature", "0", "--max_new_tokens", "40", "--device", "cpu",
            "--prompt", "    def parse(self, text):\n"]
    generate_module.main(argv)
    plain = capsys.readouterr().out
    generate_module.main(argv + ["--medusa_heads", str(TINY_HEADS)])
    ours = capsys.readouterr().out
    text = lambda out: out[: out.index("time to first token")].rstrip()  # noqa: E731
    assert text(ours) == text(plain) and "tokens per forward" in ours and "tokens per forward" not in plain
    with pytest.raises(SystemExit):
        generate_module.main(argv + ["--medusa_heads", str(TINY_HEADS), "--draft_checkpoint_path", str(TINY)])
    assert "pick one" in capsys.readouterr().err


def test_bench_medusa_runs_on_cpu(capsys):
    import bench
    bench.main(["medusa", "--checkpoint_path", str(TINY), "--max_new_tokens", "32", "--runs", "1",
                "--device", "cpu", "--dtype", "float32"])
    out = capsys.readouterr().out
    for field in ["plain decode", "medusa decode", "speed-up", "tokens per forward", "step time"]:
        assert field in out


def test_the_step_is_one_graph_that_never_recompiles(monkeypatch):
    """fullgraph tracing on CPU (aot_eager: no code generation), so a graph break shows without a GPU."""
    torch._dynamo.reset()
    monkeypatch.setattr(medusa, "compile_step", lambda fn: torch.compile(fn, backend="aot_eager", fullgraph=True))
    model, heads, tree = random_model(), random_heads(CONFIG.dim, 3), medusa.build_tree(TERNARY, 3)
    model.setup_caches(2, 96)
    eager, _ = medusa_generate(model, prompts_of([5, 9]), 24, heads=heads, tree=tree)
    compiled, _ = medusa_generate(model, prompts_of([5, 9]), 24, heads=heads, tree=tree, compile=True)
    assert compiled == eager
    with torch.compiler.set_stance("fail_on_recompile"):
        medusa_generate(model, prompts_of([13, 2], seed=1), 30, heads=heads, tree=tree, compile=True)


@pytest.mark.cuda
def test_compiled_step_matches_eager_and_never_recompiles():
    torch._dynamo.reset()
    model = random_model().cuda()
    heads, tree = random_heads(CONFIG.dim, 3).cuda(), medusa.build_tree(TERNARY, 3, "cuda")
    model.setup_caches(2, 96)
    kwargs = dict(heads=heads, tree=tree)
    eager, _ = medusa_generate(model, prompts_of([5, 9]), 24, **kwargs)
    compiled, _ = medusa_generate(model, prompts_of([5, 9]), 24, compile=True, **kwargs)
    assert compiled == eager
    medusa_generate(model, prompts_of([5, 9]), 8, temperature=0.8, top_k=50, compile=True, **kwargs)
    with torch.compiler.set_stance("fail_on_recompile"):
        medusa_generate(model, prompts_of([13, 2], seed=1), 30, compile=True, **kwargs)
        medusa_generate(model, prompts_of([7, 30], seed=2), 30, temperature=0.8, top_k=50, compile=True, **kwargs)
