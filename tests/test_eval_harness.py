"""eval.py as a model of EleutherAI's lm-evaluation-harness (issue 19), on the local tasks in tests/tasks."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is downloaded: the tasks' data are files in tests/tasks
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval.evaluator  # noqa: E402  (requirements-dev.txt)
import pytest  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402

from eval import continuation_logprobs, harness_model_class, perplexity, stdlib_texts, task_manager  # noqa: E402
from generate import generate, load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY, DRAFT = ROOT / "checkpoints/tiny-py/model.pth", ROOT / "checkpoints/tiny-py-draft/model.pth"
TASKS = ROOT / "tests/tasks"
HarnessLM = harness_model_class(TemplateLM)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY.parent)


@pytest.fixture(scope="module")
def model():
    return load_model(TINY, "cpu", torch.float32)


@pytest.fixture(scope="module")
def heldout():
    return stdlib_texts("heldout")


@pytest.fixture(autouse=True)
def _no_environment_report(monkeypatch):
    """simple_evaluate ends by collecting torch's environment report (seconds of subprocesses) into its results: the
    command line keeps it, the in-process runs here skip it."""
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


def evaluate(lm, task, **kwargs):
    """simple_evaluate on one local task; returns (its metrics, its logged samples)."""
    out = lm_eval.evaluator.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager(lm_eval, [task], TASKS),
                                            **kwargs)
    return out["results"][task], out["samples"][task]


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def full_forward_score(model, context: list[int], continuation: list[int]):
    """The reference: one plain forward of the whole (left-truncated) sequence, log-softmax, the continuation's."""
    sequence = (context + continuation)[-(model.config.block_size + 1):]
    logprobs = model(torch.tensor([sequence[:-1]])).float().log_softmax(dim=-1)[0, -len(continuation):]
    target = torch.tensor(continuation)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihood_equals_a_full_forward_token_for_token(model, tokenizer, heldout):
    code = heldout[0]
    pairs = [("import os\nimport", " sys"), ("def add(a, b):\n    return a", " + b"),
             (code[:300], code[300:420]), (code[:3000], code[3000:3100]),  # the second is cut from the left
             ("x =", " 1"), ("", "import os")]  # an empty context stands for BOS alone
    lm = HarnessLM(model, tokenizer, batch_size=4, progress=False)  # rows of mixed lengths share batches
    results = lm.loglikelihood([request("loglikelihood", c, k) for c, k in pairs])
    assert len(tokenizer.encode(pairs[3][0])) > model.config.block_size
    for (context, continuation), (score, greedy) in zip(pairs, results):
        context_ids = tokenizer.encode(context, bos=True)
        whole = tokenizer.encode(context + continuation, bos=True)
        if context:  # the harness's split: the continuation is what the whole has past the context's tokens
            expected = full_forward_score(model, context_ids, whole[len(context_ids):])
        else:
            expected = full_forward_score(model, [tokenizer.bos_id], tokenizer.encode(continuation))
        assert score == pytest.approx(expected[0], abs=1e-4) and greedy == expected[1]
    # is_greedy: the model's own greedy continuation is greedy, a changed token is not.
    prompt = tokenizer.encode("class Stack:\n    def", bos=True)
    (own,), _ = generate(load_model(TINY, "cpu", torch.float32), [prompt], 8, temperature=0.0)
    other = own[:-1] + [(own[-1] + 1) % tokenizer.vocab_size]
    assert [g for _, g in continuation_logprobs(model, [(prompt, own), (prompt, other)])] == [True, False]
    assert not model.has_cache


def test_rolling_loglikelihood_is_eval_perplexity(model, tokenizer, heldout):
    document = heldout[1]
    assert len(tokenizer.encode(document)) > 2 * model.config.block_size  # several windows and a partial one
    lm = HarnessLM(model, tokenizer, batch_size=8, progress=False)
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", document)])
    ppl = perplexity(model, tokenizer, document, model.config.block_size, batch_size=8)
    assert rolling == pytest.approx(-ppl["nll"] * ppl["tokens"], rel=1e-12)


def test_multiple_choice_above_chance_and_int8_within_a_point(tmp_path, model, tokenizer):
    for name in ("model.pth", "config.json", "tokenizer.model"):
        shutil.copy(TINY.parent / name, tmp_path / name)
    r = subprocess.run([sys.executable, str(ROOT / "quantize.py"), "--checkpoint_path", str(tmp_path / "model.pth"),
                        "--mode", "int8", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    int8 = load_model(tmp_path / "model_int8.pth", "cpu", torch.float32)
    original, samples = evaluate(HarnessLM(model, tokenizer, batch_size=32, progress=False), "pycode_mc")
    quantized, _ = evaluate(HarnessLM(int8, tokenizer, batch_size=32, progress=False), "pycode_mc")
    assert len(samples) == 105 and original["acc,none"] > 0.6  # chance is 0.25
    assert abs(quantized["acc,none"] - original["acc,none"]) <= 0.01


def test_generation_is_greedy_generate_cut_at_the_stop_string(model, tokenizer):
    lm = HarnessLM(model, tokenizer, batch_size=5, progress=False)  # prompts of mixed lengths in each batch
    metrics, samples = evaluate(lm, "pycode_gen", log_samples=True)
    reference = load_model(TINY, "cpu", torch.float32)
    assert len(samples) == 12 and 0 <= metrics["exact_match,none"] <= 1
    for sample in samples:
        context, gen_kwargs = sample["arguments"][0]
        prompt = tokenizer.encode(context, bos=True)
        (new,), _ = generate(reference, [prompt], gen_kwargs["max_gen_toks"], temperature=0.0,
                             stop_ids=tokenizer.stop_ids)  # alone, as `python generate.py --temperature 0` would
        text = tokenizer.decode(prompt + new)
        assert text.startswith(context)
        assert sample["resps"][0][0] == text[len(context):].split("\n")[0]
    assert any(sample["resps"][0][0].startswith(" ") for sample in samples)  # the leading space is kept
    # Generation ran on a twin that shares every weight; the model itself still has no cache, for scoring.
    assert lm.generator.has_cache and not model.has_cache
    assert all(a is b for a, b in zip(lm.generator.parameters(), model.parameters()))


def test_cli_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "results" / "tiny.json"
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint_path", str(DRAFT), "--device", "cpu",
                        "--tasks", "pycode_mc,pycode_gen", "--include_path", str(TASKS), "--limit", "8",
                        "--output_path", str(out)], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert "|pycode_mc" in r.stdout and "|pycode_gen" in r.stdout and "acc" in r.stdout
    results = json.loads(out.read_text())
    assert results["n-samples"]["pycode_mc"]["effective"] == 8 and "acc,none" in results["results"]["pycode_mc"]
    assert 0 <= results["results"]["pycode_gen"]["exact_match,none"] <= 1
    assert results["config"]["model"] == str(DRAFT)


def test_without_lm_eval_perplexity_works_and_tasks_say_what_to_install(tmp_path, heldout):
    """lm_eval made unimportable (None in sys.modules), as if it were not installed: `import eval` and perplexity
    never touch it."""
    text = tmp_path / "text.py"
    text.write_text(heldout[0][:2000])

    def run(*args):
        code = ("import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = ['eval.py', *sys.argv[1:]]; "
                f"runpy.run_path({str(ROOT / 'eval.py')!r}, run_name='__main__')")
        return subprocess.run([sys.executable, "-c", code, "--checkpoint_path", str(DRAFT), "--device", "cpu", *args],
                              capture_output=True, text=True, cwd=ROOT)

    r = run("--text_file", str(text), "--seq_len", "128")
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout
    r = run("--tasks", "pycode_mc")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: --tasks needs EleutherAI's lm-evaluation-harness") and "pip install" in r.stderr
