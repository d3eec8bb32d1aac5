import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import TextStream, generate, load_model, logits_to_probs, plain_decoder, sample_from, weight_bytes
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ModelArgs(block_size=128, vocab_size=512, n_layer=2, n_head=4, n_kv_heads=2, dim=32, intermediate_size=64)


@pytest.fixture
def model():
    torch.manual_seed(1)
    return Transformer(CONFIG).eval()  # default init: varied, confident predictions


@pytest.fixture
def checkpoint(tmp_path, model, sp_model_file):
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "model.pth")
    CONFIG.save(folder / "config.json")
    shutil.copy(sp_model_file, folder / "tokenizer.model")
    return folder / "model.pth"


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in lengths]


def test_ragged_batch_equals_each_row_alone(model):
    prompts = prompts_of([3, 11, 6])
    batch, _ = generate(model, prompts, 20, temperature=0.0)
    for prompt, row in zip(prompts, batch):
        alone, _ = generate(model, [prompt], 20, temperature=0.0)
        assert row == alone[0]
    assert len(set(map(tuple, batch))) == 3


def test_stops_at_any_stop_id(model):
    prompt = prompts_of([5])
    full, _ = generate(model, prompt, 30, temperature=0.0)
    stop = full[0][7]
    streamed = []
    cut, stats = generate(model, prompt, 30, temperature=0.0, stop_ids={stop, 10_000},
                          on_tokens=lambda new: streamed.extend(new[0]))
    assert cut[0] == full[0][: full[0].index(stop)] == streamed  # the stop id is neither returned nor streamed
    assert stats["decode_steps"] == full[0].index(stop)  # and it stopped decoding there


def test_batch_rows_stop_independently(model):
    prompts = prompts_of([4, 9])
    full, _ = generate(model, prompts, 25, temperature=0.0)
    stop = full[0][3]
    if stop in full[1][:3]:
        pytest.skip("pick another seed: both rows hit the stop id early")
    cut, _ = generate(model, prompts, 25, temperature=0.0, stop_ids={stop})
    for row_full, row_cut in zip(full, cut):
        expected = row_full[: row_full.index(stop)] if stop in row_full else row_full
        assert row_cut == expected


def test_warping():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    assert torch.allclose(logits_to_probs(logits), logits.softmax(-1))
    top2 = logits_to_probs(logits, top_k=2)
    assert (top2[0, 2:] == 0).all() and torch.allclose(top2[0, :2], logits[0, :2].softmax(-1))
    p = logits.softmax(-1)[0]
    nucleus = logits_to_probs(logits, top_p=float(p[0] + 0.01))  # needs the second token to pass top_p
    assert (nucleus[0, 2:] == 0).all() and (nucleus[0, :2] > 0).all()
    assert torch.allclose(logits_to_probs(logits, top_p=0.01), torch.tensor([[1.0, 0, 0, 0, 0]]))
    cold = logits_to_probs(logits, temperature=0.5)
    assert torch.allclose(cold, (logits / 0.5).softmax(-1))


def test_sampling_draws_from_the_distribution():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    draws = sample_from(probs.expand(200_000, -1))
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    assert 0.5 * (freq - probs).abs().sum() < 0.01 and freq[5] == 0


def test_weight_bytes(model):
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    norms = CONFIG.dim * (2 * CONFIG.n_layer + 1)
    assert weight_bytes(model) == 4 * (linears + norms)  # fp32, embedding table not read
    tied = Transformer(ModelArgs(**{**CONFIG.__dict__, "tie_embeddings": True}))
    assert weight_bytes(tied) == weight_bytes(model)  # the output head reads the tied table, once


def test_load_model_round_trip_and_dtype(checkpoint, model):
    loaded = load_model(checkpoint, "cpu", torch.bfloat16)
    assert loaded.output.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 512, (1, 10))
    torch.testing.assert_close(load_model(checkpoint, "cpu", torch.float32)(idx), model(idx))


def test_checkpoint_that_disagrees_with_its_config(checkpoint):
    (checkpoint.parent / "config.json").write_text(json.dumps({**CONFIG.__dict__, "intermediate_size": 80}))
    with pytest.raises(ValueError, match="does not match its config.*intermediate|shape mismatch"):
        load_model(checkpoint, "cpu")
    (checkpoint.parent / "config.json").write_text(json.dumps({**CONFIG.__dict__, "n_layer": 3}))
    with pytest.raises(ValueError, match="missing.*layers.2"):
        load_model(checkpoint, "cpu")


def test_stream_prints_exactly_the_decoded_reply(capsys, sp_model_file):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(sp_model_file)
    prompt = tok.encode("def f(x):", bos=True)
    reply = tok.encode("\n    return 'héllo wörld'  # ünïcode\n")
    stream = TextStream(tok, prompt)
    for t in reply:
        stream([[t]])
    assert capsys.readouterr().out == tok.decode(prompt + reply)[len(tok.decode(prompt)):]


def test_compiled_decode_never_recompiles(model):
    """The decode step is compiled once per sampling setting; other prompts, lengths and positions reuse it."""
    torch._dynamo.reset()
    model.setup_caches(2, 64)

    def compiled(temperature, **kwargs):
        return plain_decoder(model, temperature, compile=True, **kwargs)
    eager, _ = generate(model, prompts_of([5, 9]), 12, temperature=0.0)
    out, _ = generate(model, prompts_of([5, 9]), 12, decoder=compiled(0.0))
    assert out == eager
    generate(model, prompts_of([5, 9]), 4, decoder=compiled(0.8, top_k=50))
    with torch.compiler.set_stance("fail_on_recompile"):
        generate(model, prompts_of([13, 2], seed=1), 20, decoder=compiled(0.0))
        generate(model, prompts_of([7, 30], seed=2), 20, decoder=compiled(0.8, top_k=50))


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("case", ["missing", "too_long", "mismatch"])
def test_cli_errors_are_one_clear_line(case, checkpoint, tmp_path):
    from train_tiny import train_tokenizer
    from eval import stdlib_texts
    train_tokenizer(stdlib_texts("heldout")[:5], checkpoint.parent / "tokenizer.model", vocab_size=512)
    if case == "missing":
        r, expect = run_cli("--checkpoint_path", tmp_path / "nope" / "model.pth"), "prepare.sh"
    elif case == "too_long":
        r, expect = run_cli("--checkpoint_path", checkpoint, "--max_new_tokens", 200), "exceeds the model's context"
    else:
        (checkpoint.parent / "config.json").write_text(json.dumps({**CONFIG.__dict__, "dim": 64}))
        r, expect = run_cli("--checkpoint_path", checkpoint), "does not match its config"
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and expect in lines[-1] and lines[-1].startswith("error:")


def test_cli_generates_and_summarises(checkpoint):
    from train_tiny import train_tokenizer
    from eval import stdlib_texts
    train_tokenizer(stdlib_texts("heldout")[:5], checkpoint.parent / "tokenizer.model", vocab_size=512)
    r = run_cli("--checkpoint_path", checkpoint, "--max_new_tokens", 20, "--batch_size", 2, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for field in ["time to first token", "tok/s", "GB/s", "peak memory", "--- [1]"]:
        assert field in r.stdout
