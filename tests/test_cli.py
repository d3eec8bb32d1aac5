"""Every command line against hostile-but-realistic input: a nonsense flag, a damaged file, two writers, a full disk,
a stalled rank. Each must end in one `error:` line and a non-zero exit, with no traceback, no hang and no file under
a final name that a run did not complete; the clean cases must stay clean.

Most cases run in one worker process per tool (`cli.run(tool.main)`, exactly what each tool's `__main__` does), to
pay for importing torch once; the cases that need a process of their own (a disk limit, two writers, torchrun) run
the real command lines."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
from model import ModelArgs, Transformer, linear_names
from quantize import quantize_int8

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "checkpoints/tiny-py"
CONFIG = ModelArgs(block_size=128, vocab_size=4096, n_layer=2, n_head=4, n_kv_heads=2, dim=64, intermediate_size=96)

# Runs [tool, argv, stdin] cases in this one process and prints, per case, the exit status and what reached stderr.
WORKER = r"""
import contextlib, importlib, io, json, sys, traceback
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/scripts"]
import cli
results = []
for tool, argv, stdin in json.load(sys.stdin):
    sys.argv, sys.stdin, err = [tool, *argv], io.StringIO(stdin), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.run(importlib.import_module(tool.removesuffix(".py")).main)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=err)
        except BaseException:
            traceback.print_exc(file=err)
            code = -1
    results.append(dict(code=code, stderr=err.getvalue()))
print(json.dumps(results))
"""


def run_cases(cases: list, timeout=600) -> list:
    """[(tool, argv[, stdin])] -> [{"code", "stderr"}], in one worker process."""
    cases = [(tool, [str(a) for a in argv], stdin[0] if stdin else "") for tool, argv, *stdin in cases]
    r = subprocess.run([sys.executable, "-c", WORKER, str(ROOT)], input=json.dumps(cases), capture_output=True,
                       text=True, timeout=timeout, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def assert_one_error_line(result: dict, expect: str, case):
    lines = [line for line in result["stderr"].splitlines() if "error:" in line]
    assert result["code"] not in (0, -1) and "Traceback" not in result["stderr"], (case, result)
    assert len(lines) == 1 and expect in lines[0], (case, result["stderr"][-2000:])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small model and a family of damaged copies of it, each in a folder of its own with a tokenizer."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    state = {k: v.bfloat16() for k, v in Transformer(CONFIG).state_dict().items()}

    def folder(name, tensors=state, config=None, tokenizer=TINY / "tokenizer.model"):
        d = root / name
        d.mkdir()
        if tensors is not None:
            torch.save(tensors, d / "model.pth")
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config or CONFIG.__dict__))
        if tokenizer is not None:
            shutil.copy(tokenizer, d / "tokenizer.model")
        return d / "model.pth"

    good = folder("good")
    paths = dict(good=good)
    for name, data in [("empty", b""), ("random", os.urandom(4096)), ("truncated", good.read_bytes()[:3000])]:
        paths[name] = folder(name, None)
        paths[name].write_bytes(data)
    paths["int64"] = folder("int64", {**state, "norm.weight": state["norm.weight"].long()})
    for name, change in [("rope_base", dict(rope_base=0)), ("window", dict(sliding_window=0)), ("dim", dict(dim=-64)),
                         ("dim_text", dict(dim="64"))]:
        paths[name] = folder(name, config={**CONFIG.__dict__, **change})
    paths["bad_json"] = folder("bad_json", config="{not json")
    int8 = dict(state, quantization={"mode": "int8"})
    for name in linear_names(Transformer(CONFIG)):
        int8[f"{name}.weight"], int8[f"{name}.scales"] = quantize_int8(state[f"{name}.weight"])
    int8[f"{name}.scales"][3] = float("nan")
    paths["nan_scales"] = folder("nan_scales", int8)
    for name, entry in [("no_groupsize", {"mode": "int4"}), ("zero_groupsize", {"mode": "int4", "groupsize": 0}),
                        ("text_groupsize", {"mode": "int4", "groupsize": "32"}), ("anyprec_widths", {"mode": "anyprec"}),
                        ("unknown_mode", {"mode": "int3"})]:
        paths[name] = folder(name, {**state, "quantization": entry})
    paths["empty_tokenizer"] = folder("empty_tokenizer", tokenizer=None)
    (paths["empty_tokenizer"].parent / "tokenizer.model").write_bytes(b"")
    return root, paths


def test_argument_types_say_what_is_allowed():
    import argparse
    assert cli.at_least(1)("3") == 3 and cli.at_least(0.0, float)("0.5") == 0.5 and cli.probability("1") == 1.0
    for parse, text, message in [(cli.at_least(1), "0", "at least 1"), (cli.at_least(1), "x", "an integer"),
                                 (cli.at_least(0.0, float), "nan", "at least 0.0"), (cli.probability, "0", "(0, 1]"),
                                 (cli.probability, "1.5", "(0, 1]"), (cli.positive, "0", "above 0"),
                                 (cli.device, "tpu", "unknown device")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message.replace("(", r"\(").replace("]", r"\]")):
            parse(text)


def test_generate_refuses_nonsense_settings_and_damaged_files(files, tmp_path):
    _, paths = files
    good = ["--checkpoint_path", paths["good"], "--device", "cpu", "--max_new_tokens", "4"]
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    cases = [
        (["--top_p", "0"], "top_p"), (["--top_p", "-0.2"], "top_p"), (["--temperature", "nan"], "temperature"),
        (["--temperature", "-1"], "temperature"), (["--max_new_tokens", "0"], "max_new_tokens"),
        (["--max_new_tokens", "-1"], "max_new_tokens"), (["--max_seq_length", "0"], "max_seq_length"),
        (["--top_k", "0"], "top_k"), (["--top_k", "-3"], "top_k"), (["--num_samples", "0"], "num_samples"),
        (["--batch_size", "0"], "batch_size"), (["--device", "tpu"], "device"), (["--speculate_k", "0"], "speculate_k"),
        (["--prompt_file", tmp_path], "--prompt_file"), (["--prompt_file", tmp_path / "empty.txt"], "holds no prompt"),
        (["--prompt_file", tmp_path / "latin1.txt"], "not UTF-8"),
        (["--prompt_file", tmp_path / "nope.txt"], "--prompt_file"),
        (["--max_new_tokens", "500"], "exceeds the model's context"),
        (["--max_seq_length", "20", "--max_new_tokens", "30"], "--max_seq_length"),
        (["--precision", "9"], "any-precision"),
        (["--medusa_heads", TINY / "medusa_heads.safetensors", "--draft_precision", "3"], "pick one"),
        (["--interactive", "--max_new_tokens", "128"], "the chat's cache"),
    ]
    files_cases = [
        ("missing", paths["good"].parent / "nope.pth", "not found"), ("folder", paths["good"].parent, "is a folder"),
        ("empty", paths["empty"], "not a readable checkpoint"), ("random", paths["random"], "not a readable"),
        ("truncated", paths["truncated"], "not a readable checkpoint"), ("int64", paths["int64"], "norm.weight is"),
        ("rope_base", paths["rope_base"], "rope_base"), ("window", paths["window"], "sliding_window"),
        ("dim", paths["dim"], "dim is -64"), ("dim_text", paths["dim_text"], "dim is '64'"),
        ("bad_json", paths["bad_json"], "not valid JSON"), ("no_groupsize", paths["no_groupsize"], "group size None"),
        ("zero_groupsize", paths["zero_groupsize"], "group size 0"),
        ("text_groupsize", paths["text_groupsize"], "group size '32'"),
        ("anyprec_widths", paths["anyprec_widths"], "any-precision"),
        ("unknown_mode", paths["unknown_mode"], "unknown quantization mode"),
        ("nan_scales", paths["nan_scales"], "NaN or infinite"),
        ("empty_tokenizer", paths["empty_tokenizer"], "not a readable tokenizer"),
    ]
    argv = [good + flags for flags, _ in cases] + [
        ["--checkpoint_path", path, "--device", "cpu", "--max_new_tokens", "4"] for _, path, _ in files_cases]
    results = run_cases([("generate.py", a) for a in argv])
    for (case, expect), result in zip([(f, e) for f, e in cases] + [(n, e) for n, _, e in files_cases], results):
        assert_one_error_line(result, expect, case)


def test_medusa_heads_and_training_refuse_what_cannot_work(files, tmp_path):
    import medusa
    _, paths = files
    good = ["--checkpoint_path", TINY / "model.pth", "--device", "cpu", "--max_new_tokens", "4"]
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(300))
    wide = medusa.MedusaHeads(256, 2, vocab_size=100)  # the tiny model's width, another vocabulary
    medusa.save_heads(wide, tmp_path / "other_vocab.safetensors", {})
    shutil.copy(TINY / "medusa_heads.safetensors", tmp_path / "stale.safetensors")
    json_text = (TINY / "medusa_heads.json").read_text().replace('"heads_sha256": "', '"heads_sha256": "0')
    (tmp_path / "stale.json").write_text(json_text)
    train = ["train", "--checkpoint_path", TINY / "model.pth", "--device", "cpu", "--steps", "1", "--batch_size", "1",
             "--calibration_samples", "1", "--seq_len", "64"]
    cases = [("generate.py", good + ["--medusa_heads", tmp_path / f"{name}.safetensors"], expect) for name, expect in
             [("empty", "not a readable safetensors"), ("garbage", "not a readable safetensors"),
              ("other_vocab", "a vocabulary of 100"), ("stale", "written for other heads"), ("nope", "not found")]]
    cases += [("medusa.py", train[:1] + ["--steps", "0"] + train[1:], "--steps"),
              ("medusa.py", train + ["--num_heads", "0"], "--num_heads"),
              ("medusa.py", train + ["--lr", "-1"], "--lr"),
              ("medusa.py", train + ["--medusa_heads", tmp_path / "no" / "heads.safetensors"], "cannot write")]
    results = run_cases([(tool, argv) for tool, argv, _ in cases])
    for (tool, argv, expect), result in zip(cases, results):
        assert_one_error_line(result, expect, argv)


def test_quantizers_and_eval_refuse_nonsense_and_name_the_file(files, tmp_path):
    _, paths = files
    (tmp_path / "dim").mkdir()
    good = ["--checkpoint_path", paths["good"], "--device", "cpu"]
    cases = [
        ("quantize.py", good + ["--mode", "int4-gptq", "--calibration_samples", "0"], "--calibration_samples"),
        ("quantize.py", good + ["--mode", "int4-gptq", "--damp", "-1"], "--damp"),
        ("quantize.py", good + ["--mode", "int4", "--groupsize", "48"], "--groupsize"),
        ("quantize.py", good + ["--device", "tpu"], "--device"),
        ("quantize.py", ["--checkpoint_path", paths["truncated"], "--device", "cpu"], "not a readable checkpoint"),
        ("anyprec.py", good + ["--calibration_samples", "0"], "--calibration_samples"),
        ("anyprec.py", good + ["--seed_precision", "2"], "seed_precision"),
        ("anyprec.py", ["--checkpoint_path", paths["dim"], "--device", "cpu"], "dim is -64"),
        ("convert_hf_checkpoint.py", ["--checkpoint_dir", tmp_path / "dim"], "no config.json"),
        ("download.py", ["--repo_id", "meta-llama/Llama-2-7b-hf", "--out_dir", tmp_path], "cannot reach the Hugging"),
        ("eval.py", good + ["--seq_len", "-1"], "--seq_len"), ("eval.py", good + ["--max_tokens", "0"], "--max_tokens"),
        ("eval.py", good + ["--text_file", tmp_path / "empty.txt"], "is empty"),
        ("eval.py", good + ["--text_file", tmp_path / "latin1.txt"], "not UTF-8"),
        ("eval.py", good + ["--text_file", tmp_path / "nope.txt"], "--text_file"),
    ]
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    results = run_cases([(tool, argv) for tool, argv, _ in cases])
    for (tool, argv, expect), result in zip(cases, results):
        assert_one_error_line(result, expect, (tool, argv))
    assert not list(paths["good"].parent.glob("model_*")) and not list(paths["good"].parent.glob(".*.partial"))


def test_clean_runs_stay_clean(files):
    _, paths = files
    good = ["--checkpoint_path", paths["good"], "--device", "cpu"]
    cases = [("generate.py", good + ["--max_new_tokens", "4", "--top_p", "0.9", "--temperature", "0.5"]),
             ("generate.py", good + ["--max_new_tokens", "4", "--batch_size", "2", "--top_k", "1"]),
             ("generate.py", good + ["--interactive", "--max_new_tokens", "4"], "hello\n/reset\n/exit\n"),
             ("quantize.py", good + ["--mode", "int8"])]
    for case, result in zip(cases, run_cases(cases)):
        assert result["code"] == 0 and "error" not in result["stderr"], (case, result["stderr"][-2000:])
    assert (paths["good"].parent / "model_int8.pth").is_file()


def copy_model(files, folder: Path) -> Path:
    """The fixture's good model, alone in a folder of its own."""
    folder.mkdir()
    for name in ("model.pth", "config.json", "tokenizer.model"):
        shutil.copy(files[1]["good"].parent / name, folder / name)
    return folder / "model.pth"


def quantize_command(checkpoint, *flags):
    return [sys.executable, str(ROOT / "quantize.py"), "--checkpoint_path", str(checkpoint), "--device", "cpu",
            *map(str, flags)]


def test_two_writers_of_one_output_never_mix(files, tmp_path):
    """GPTQ with two dampings to the same file, at the same time: the file under the final name is one run's, whole
    (its metadata and its bytes both that run's), and no temporary file is left."""
    checkpoint = copy_model(files, tmp_path / "m")
    (tmp_path / "m" / "text.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    flags = ["--mode", "int4-gptq", "--groupsize", "32", "--calibration_file", tmp_path / "m" / "text.txt",
             "--calibration_samples", "4", "--calibration_seq_len", "64"]
    out = tmp_path / "m" / "model_int4-gptq.g32.pth"
    alone = {}
    for damp in ("0.01", "0.5"):
        subprocess.run(quantize_command(checkpoint, *flags, "--damp", damp), check=True, capture_output=True)
        alone[float(damp)] = out.read_bytes()
    out.unlink()
    runs = [subprocess.Popen(quantize_command(checkpoint, *flags, "--damp", d), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for d in ("0.01", "0.5")]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    damp = torch.load(out, weights_only=True)["quantization"]["damp"]
    assert out.read_bytes() == alone[damp]
    assert not list(out.parent.glob(".*.partial"))


def test_a_full_disk_is_one_line_and_leaves_nothing(files, tmp_path):
    """A file-size limit (what a full disk looks like to the writer) stops quantize.py mid-write."""
    copy_model(files, tmp_path / "m")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # noqa: E731
    r = subprocess.run(quantize_command(tmp_path / "m" / "model.pth", "--mode", "int8"), capture_output=True,
                       text=True, preexec_fn=limit, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr and lines[-1].startswith("error: no space left"), r.stderr
    assert str(tmp_path / "m") in lines[-1]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.pth", "tokenizer.model"]


def test_a_stalled_rank_ends_the_job_within_the_timeout():
    """One rank stopped (SIGSTOP) while decoding: the other waits --timeout seconds, says so in one line, and the
    job ends."""
    import threading
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "generate.py"), "--checkpoint_path", str(TINY / "model.pth"), "--device", "cpu",
               "--max_new_tokens", "400", "--num_samples", "100", "--timeout", "10", "--prompt", "import os"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    stderr = []
    threading.Thread(target=lambda: stderr.extend(job.stderr), daemon=True).start()
    start = time.time()
    while not any("loaded" in line for line in stderr) and time.time() - start < 120:
        time.sleep(0.2)
    time.sleep(2)  # decoding now
    ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, "".join(stderr)
    os.kill(int(ranks[1]), signal.SIGSTOP)
    stopped = time.time()
    job.wait(timeout=120)
    text = "".join(stderr)
    assert job.returncode != 0 and time.time() - stopped < 10 + 60, text[-3000:]
    assert "heard nothing from the other ranks for 10 s (--timeout)" in text, text[-3000:]
