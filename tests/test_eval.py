"""eval.py and the shipped tiny models (issue: a tiny trained model shipped in the repo)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval import calibration_windows, encode_documents, perplexity, stdlib_split, stdlib_texts
from generate import load_model
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY, DRAFT = ROOT / "checkpoints/tiny-py/model.pth", ROOT / "checkpoints/tiny-py-draft/model.pth"
SLICE = 40_000  # held-out tokens scored per model: seconds on 2 cores, thousands of windows' worth of signal


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY.parent)


@pytest.fixture(scope="module")
def heldout():
    return stdlib_texts("heldout")


def unigram_perplexity(tokenizer, heldout_stream):
    """Train-split token frequencies (add-one smoothed) scored on the held-out tokens."""
    counts = torch.bincount(encode_documents(tokenizer, stdlib_texts("train")), minlength=tokenizer.vocab_size)
    logp = (counts.double() + 1).div(counts.sum() + len(counts)).log()
    return torch.exp(-logp[heldout_stream[1:]].mean()).item()


def test_split_is_stable_and_about_five_percent():
    assert stdlib_split("os.py") == stdlib_split("os.py")
    names = [f"pkg/module_{i}.py" for i in range(4000)]
    share = sum(stdlib_split(n) == "heldout" for n in names) / len(names)
    assert 0.04 < share < 0.06
    heldout, train = stdlib_texts("heldout"), stdlib_texts("train")
    assert len(heldout) > 20 and not set(heldout) & set(train)


def test_shipped_models_beat_each_other_and_unigram(tokenizer, heldout):
    tiny = perplexity(load_model(TINY, "cpu", torch.float32), tokenizer, heldout, 512, max_tokens=SLICE)
    draft = perplexity(load_model(DRAFT, "cpu", torch.float32), tokenizer, heldout, 512, max_tokens=SLICE)
    unigram = unigram_perplexity(tokenizer, encode_documents(tokenizer, heldout)[: SLICE + 1])
    assert tiny["tokens"] == draft["tokens"] == SLICE
    assert tiny["perplexity"] < 0.85 * draft["perplexity"]  # well below
    assert draft["perplexity"] < 0.2 * unigram  # both far below a unigram model of the same tokens


def test_perplexity_is_reproducible_and_counts_every_token_once(tokenizer, heldout):
    model = load_model(DRAFT, "cpu", torch.float32)
    a = perplexity(model, tokenizer, heldout[:3], 100, batch_size=4)
    b = perplexity(model, tokenizer, heldout[:3], 100, batch_size=3)  # other batching, same windows
    assert a["tokens"] == len(encode_documents(tokenizer, heldout[:3])) - 1
    assert abs(a["nll"] - b["nll"]) < 1e-6
    assert perplexity(model, tokenizer, heldout[:3], 100, batch_size=4) == a


def test_eval_cli(tmp_path):
    text = tmp_path / "text.py"
    text.write_text(stdlib_texts("heldout")[0])
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint_path", str(DRAFT), "--text_file",
                        str(text), "--seq_len", "128", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "mean NLL" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint_path", str(DRAFT), "--seq_len", "4096"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "block_size" in r.stderr


def test_shipped_checkpoint_is_checked_against_its_config(tmp_path):
    for f in TINY.parent.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert load_model(tmp_path / "model.pth", "cpu").config.n_layer == config["n_layer"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_kv_heads": 2}))
    with pytest.raises(ValueError, match="does not match its config"):
        load_model(tmp_path / "model.pth", "cpu")


def test_calibration_windows(tokenizer):
    w = calibration_windows(tokenizer, samples=4, seq_len=64)
    assert w.shape == (4, 64) and torch.equal(w, calibration_windows(tokenizer, samples=4, seq_len=64))


def test_default_generate_writes_python():
    """The README's first command: the shipped model continues in Python (sampled, as by default)."""
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--prompt", "def fibonacci(n):",
                        "--max_new_tokens", "100", "--seed", "1", "--device", "cpu"],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("time to first token")[0]
    assert text.startswith("def fibonacci(n):") and text.count("\n") >= 3
    keywords = {"def", "return", "import", "class", "if", "for", "in", "self", "None", "from", "is", "not"}
    assert len(keywords & set(re.findall(r"[A-Za-z_]+", text[17:]))) >= 3
