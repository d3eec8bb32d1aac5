"""model.py and the user's path to it (Hub folder -> convert -> load_model) against Hugging Face transformers."""
import json

import pytest
import torch
import torch.nn.functional as F

import convert_hf_checkpoint
from generate import generate, load_model
from hf_models import FAMILIES, save_hf_model
from model import ModelArgs, Transformer, causal_mask, linear, transformer_configs


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hub_folder(request, tmp_path_factory):
    """(family, transformers model, folder): a Hub-style download, converted as a user does."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, folder)
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, as real checkpoints are
    convert_hf_checkpoint.main(["--checkpoint_dir", str(folder)])
    return request.param, hf, folder


@pytest.fixture
def converted(hub_folder):
    family, hf, folder = hub_folder
    return family, hf, load_model(folder / "model.pth", "cpu", torch.float32)


def assert_close(ours, ref, rel=1e-4):
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err < rel, f"max error {err:.2e} relative to the largest logit"


@torch.no_grad()
def test_whole_prompt_logits_match_transformers(converted):
    family, hf, model = converted
    idx = torch.randint(0, hf.config.vocab_size, (2, 50))  # longer than mistral's sliding window of 24
    assert_close(model(idx), hf(idx).logits)


@torch.no_grad()
def test_token_by_token_through_cache_matches_transformers(converted):
    family, hf, model = converted
    idx = torch.randint(0, hf.config.vocab_size, (2, 40))
    ref = hf(idx).logits
    model.setup_caches(2, 64)
    first = model(idx[:, :10], torch.arange(10))  # a prefill, then single tokens
    steps = [model(idx[:, i: i + 1], torch.tensor([i])) for i in range(10, 40)]
    assert_close(torch.cat([first, *steps], dim=1), ref)


@torch.no_grad()
def test_greedy_generation_matches_transformers(converted):
    family, hf, model = converted
    prompt = torch.randint(0, hf.config.vocab_size, (1, 7))
    ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours, _ = generate(model, [prompt[0].tolist()], 32, temperature=0.0)
    assert ours[0] == ref[0, 7:].tolist()


def test_converted_config_and_files(converted, tmp_path):
    family, hf, model = converted
    c = model.config
    assert (c.n_head, c.n_kv_heads, c.dim) == (hf.config.num_attention_heads, hf.config.num_key_value_heads,
                                               hf.config.hidden_size)
    assert c.tie_embeddings == (family == "llama3.2")
    assert (c.rope_scaling is not None) == family.startswith("llama3")
    assert (c.sliding_window is not None) == (family == "mistral")
    if c.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight


@torch.no_grad()
def test_rows_at_different_positions_equal_rows_alone():
    """input_pos [B, S] lets every row of a batch sit at its own length."""
    config = ModelArgs(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_kv_heads=2, dim=32, intermediate_size=64)
    model = Transformer(config).eval()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    model.setup_caches(2, 32)
    model(torch.cat([a[:, :8], torch.cat([b[:, :4], torch.zeros(1, 4, dtype=torch.long)], 1)]), torch.arange(8))
    both = model(torch.cat([a[:, 8:], b[:, 4:]]), torch.tensor([[8], [4]]))
    alone = Transformer(config).eval()
    alone.load_state_dict(model.state_dict())
    for row, seq in enumerate([a, b]):
        alone.setup_caches(1, 32)  # stale slots from the previous row are never attended
        ref = alone(seq, torch.arange(seq.shape[1]))[:, -1]
        torch.testing.assert_close(both[row, -1], ref[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_linear_equals_f_linear(dtype):
    """model.linear compiled on a CPU (a product and a sum for one row, the matrix product for more) is F.linear."""
    weight = torch.randn(300, 257).to(dtype)
    compiled = torch.compile(linear, fullgraph=True, dynamic=False)
    tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    for shape in [(1, 257), (1, 1, 257), (3, 257), (2, 1, 257)]:
        x = torch.randn(shape).to(dtype)
        torch.testing.assert_close(compiled(x, weight), F.linear(x, weight), **tolerance)


@torch.no_grad()
def test_compiled_cpu_decode_step_equals_eager():
    """On a CPU under torch.compile a one-token step attends one query head at a time (its own code path): its
    logits equal the eager step's, with GQA, rows at different positions and a sliding window."""
    config = ModelArgs(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_kv_heads=2, dim=32, intermediate_size=64,
                       sliding_window=6)
    eager, compiled = Transformer(config).eval(), Transformer(config).eval()
    compiled.load_state_dict(eager.state_dict())
    prompt = torch.randint(0, 97, (2, 8))
    for model in (eager, compiled):
        model.setup_caches(2, 32)
        model(prompt, torch.arange(8))
    step = torch.compile(compiled, fullgraph=True, dynamic=False)
    for i in range(8, 16):  # past the window of 6
        token, pos = torch.randint(0, 97, (2, 1)), torch.tensor([[i], [i - 3]])
        torch.testing.assert_close(step(token, pos), eager(token, pos), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_explicit_mask_and_cache_slots():
    """A caller's mask and KV slots (what tree decoding uses) give the same logits as the plain causal path."""
    config = ModelArgs(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_kv_heads=1, dim=32, intermediate_size=64)
    model = Transformer(config).eval()
    idx = torch.randint(0, 97, (2, 12))
    model.setup_caches(2, 16)
    ref = model(idx, torch.arange(12))
    mask = causal_mask(torch.arange(12).expand(2, -1), 16)
    out = model(idx, torch.arange(12), cache_pos=torch.arange(12).expand(2, -1), mask=mask)
    torch.testing.assert_close(out, ref)
    no_cache = Transformer(config).eval()
    no_cache.load_state_dict(model.state_dict())
    torch.testing.assert_close(no_cache(idx), ref, atol=1e-5, rtol=1e-5)


# Parameter counts published for these models (embeddings included).
PUBLISHED = {"Llama-2-7b-hf": 6.74e9, "Llama-2-13b-hf": 13.0e9, "Llama-2-70b-hf": 69.0e9, "Meta-Llama-3-8B": 8.03e9,
             "Llama-3.1-70B": 70.6e9, "Llama-3.1-405B": 405.9e9, "Llama-3.2-1B": 1.24e9, "Llama-3.2-3B": 3.21e9,
             "Mistral-7B-v0.1": 7.24e9, "TinyLlama-1.1B": 1.10e9, "CodeLlama-34b-hf": 33.7e9}


@pytest.mark.parametrize("name", sorted(transformer_configs))
def test_registry_shapes(name):
    config = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = Transformer(config)
    n = sum(p.numel() for p in model.parameters())
    if name in PUBLISHED:
        assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.01, f"{name}: {n / 1e9:.2f}B parameters"
    assert config.n_head * config.head_dim in (config.dim, 4096)  # Llama-3.2-3B: 24 x 128 = 3072


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match="Llama-2-7b-hf"):
        ModelArgs.from_name("llama-2-7b")


def test_registry_is_the_fallback_for_a_bare_checkpoint(tmp_path):
    folder = tmp_path / "TinyLlama-1.1B-Chat-v1.0"
    folder.mkdir()
    assert ModelArgs.for_checkpoint(folder / "model.pth").n_layer == 22
    (folder / "config.json").write_text(json.dumps({"n_layer": 3, "n_head": 2, "dim": 8}))
    assert ModelArgs.for_checkpoint(folder / "model.pth").n_layer == 3  # config.json wins
    with pytest.raises(ValueError, match="no config.json"):
        ModelArgs.for_checkpoint(tmp_path / "my-model" / "model.pth")
