"""Tensor parallelism on CPU with gloo. The multi-rank cases run this same file under torchrun (see `worker` at the
bottom): every rank loads its shard, and rank 0 checks the results against the whole model loaded in-process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model import ModelArgs, Transformer  # noqa: E402
from quantize import swap_linears  # noqa: E402
from tp import apply_tp  # noqa: E402

TINY = ROOT / "checkpoints/tiny-py/model.pth"
TINY_DRAFT = ROOT / "checkpoints/tiny-py-draft/model.pth"
# GQA with 2 kv heads: split across 2 ranks, replicated across 4 (as the tiny draft's are). Widths such that 4 ranks
# still take whole int4 groups of 32 (wo: 128 inputs, w2: 256).
GQA = ModelArgs(block_size=128, vocab_size=512, n_layer=2, n_head=8, n_kv_heads=2, dim=128, intermediate_size=256)


def torchrun(n: int, *args, script=__file__) -> str:
    """Run this file's worker (or `script`) on n ranks; its stdout if every rank succeeded."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def save_model(config: ModelArgs, folder: Path, dtype=torch.bfloat16, seed=1) -> Path:
    torch.manual_seed(seed)
    model = Transformer(config)  # default init: varied, confident predictions
    folder.mkdir(parents=True)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()
             if not (config.tie_embeddings and k == "output.weight")}
    torch.save(state, folder / "model.pth")
    config.save(folder / "config.json")
    return folder / "model.pth"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sp_model_file) -> list[str]:
    """The shipped tiny model and its draft (tied embeddings), and the GQA model in bf16, int8, int4 (round to nearest
    and GPTQ, groups of 32) and any-precision (3 to 8 bits)."""
    import quantize
    from anyprec import quantize_state
    from eval import stdlib_texts
    from model import linear_names
    path = save_model(GQA, tmp_path_factory.mktemp("tp") / "gqa")
    shutil.copy(sp_model_file, path.parent / "tokenizer.model")
    calibration = path.parent / "calibration.txt"
    calibration.write_text("\n".join(stdlib_texts("train")[:3]))
    gptq = ["--calibration_file", str(calibration), "--calibration_samples", "8", "--calibration_seq_len", "64"]
    state = torch.load(path, weights_only=True)
    with torch.device("meta"):
        names = linear_names(Transformer(GQA), include_output=False)
    fisher = {name: torch.rand(state[f"{name}.weight"].shape) + 0.1 for name in names}
    anyprec = path.with_name("model_anyprec.3-8.pth")
    torch.save(quantize_state(state, fisher, progress=False)[0], anyprec)

    def quantized(mode, *flags):
        return quantize.main(["--checkpoint_path", str(path), "--mode", mode, "--device", "cpu", *flags])
    quantized = [quantized("int8"), quantized("int4", "--groupsize", "32"),
                 quantized("int4-gptq", "--groupsize", "32", *gptq), anyprec]
    return [str(p) for p in (TINY, TINY_DRAFT, path, *quantized)]


def test_two_ranks_equal_one_also_compiled_and_speculative(checkpoints):
    out = torchrun(2, "logits", *checkpoints, "compiled", checkpoints[2], "speculative", str(TINY_DRAFT))
    print(out)
    assert "speculative, draft replicated and sharded: 48 sampled tokens identical" in out
    assert out.count("greedy tokens identical") == len(checkpoints) + 1, out  # any-precision: at 3 and at 8 bits
    assert "compiled prefill and decode: 32 tokens identical" in out


def test_four_ranks_equal_one_with_kv_heads_replicated(checkpoints):
    out = torchrun(4, "logits", *checkpoints)
    print(out)
    assert out.count("greedy tokens identical") == len(checkpoints) + 1, out


def test_generate_py_under_torchrun_prints_once_and_matches(capsys):
    """The command line a user runs: sampled text (seeded alike on every rank) equal to one process's, printed once."""
    from generate import main
    args = ["--checkpoint_path", str(TINY), "--device", "cpu", "--prompt", "def main(", "--max_new_tokens", "40",
            "--temperature", "0.8", "--seed", "3"]
    main(args)
    text = capsys.readouterr().out.split(" time to first token")[0]
    two = torchrun(2, *args, script="generate.py")
    assert len(text) > len("def main(") + 20
    assert two.startswith(text) and two.count("def main(") == 1 and two.count("time to first token") == 1
    assert "GB per rank" in two


def test_each_rank_holds_about_half_the_model(tmp_path):
    """Peak private memory of a sharded fp32 load from a bf16 file, on each of 2 ranks, against one process."""
    config = ModelArgs(block_size=64, vocab_size=256, n_layer=6, n_head=8, dim=512, intermediate_size=2048)
    path = save_model(config, tmp_path / "big")  # 25M parameters: 50 MB on disk, 100 MB in fp32
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, __file__, "memory", str(path)], capture_output=True, text=True, cwd=ROOT,
                         env=env, check=True)
    whole = json.loads(one.stdout.splitlines()[-1])["peak_mb"]
    ranks = [json.loads(line) for line in torchrun(2, "memory", str(path)).splitlines() if line.startswith("{")]
    assert len(ranks) == 2
    assert 95 < whole < 130  # the fp32 copy of 25M parameters
    for r in ranks:
        assert r["peak_mb"] < 0.55 * whole, (whole, ranks)  # half the layers, plus the replicated embedding
    print(f"peak MB: one process {whole:.0f}, ranks {[round(r['peak_mb']) for r in ranks]}")


def test_bench_tp_times_one_and_two_ranks(monkeypatch, capsys):
    from bench import main
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # on CPU, tp goes up to the core count
    main(["tp", "--checkpoint_path", str(TINY), "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "8",
          "--runs", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.lstrip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"] and rows[0][2] == "1.00x"
    assert all(float(row[1]) > 0 and float(row[4]) > 0 for row in rows)


@pytest.mark.cuda
def test_compiled_decode_over_nccl_equals_the_whole_model():
    ranks = min(torch.cuda.device_count(), 4)  # one on the machines lent here: NCCL and the CUDA graph all the same
    assert f"cuda on {ranks} ranks" in torchrun(ranks, "cuda", str(TINY))


def test_refuses_what_does_not_divide():
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_json(TINY.parent / "config.json"))
    with pytest.raises(ValueError, match=r"n_head \(8\) is not divisible by 3; use --nproc_per_node in \[1, 2, 4, 8\]"):
        apply_tp(model, rank=0, world=3)
    with torch.device("meta"):
        model = Transformer(ModelArgs(n_layer=1, n_head=4, n_kv_heads=4, dim=64, intermediate_size=90))
    with pytest.raises(ValueError, match=r"intermediate_size \(90\) is not divisible by 4; .* in \[1, 2\]"):
        apply_tp(model, rank=0, world=4)
    with torch.device("meta"):  # int4 with groups of 128: wo's 256 inputs are 2 groups, 4 ranks cannot share them
        model = Transformer(ModelArgs.from_json(TINY.parent / "config.json"))
        swap_linears(model, {"mode": "int4", "groupsize": 128})
    with pytest.raises(ValueError, match=r"attention.wo's 2 groups of inputs are not divisible by 4 .* in \[1, 2\]"):
        apply_tp(model, rank=0, world=4)


def test_eight_kv_heads_on_sixteen_ranks_are_replicated():
    """Llama-3-70B's shapes (64 query heads, 8 kv heads) on 16 ranks: 4 query heads and 1 kv head per rank, the kv
    head shared by the 2 ranks whose queries use it."""
    config = ModelArgs(**dict(ModelArgs.from_name("Meta-Llama-3-70B").__dict__, n_layer=2))
    for rank in (0, 5, 15):
        with torch.device("meta"):
            model = Transformer(config)
        apply_tp(model, rank=rank, world=16)
        attention = model.layers[0].attention
        assert (attention.n_head, attention.n_kv_heads) == (4, 1)
        assert attention.wqkv.weight.shape == ((4 + 2) * 128, 8192)
        assert attention.wo.weight.shape == (8192, 4 * 128)
        assert model.layers[1].feed_forward.w2.weight.shape == (8192, 28672 // 16)
        # Query head h uses kv head h // 8: rank r's first query head is 4r, so its kv head is r // 2.
        assert rank * 4 // 8 == rank * config.n_kv_heads // 16


# ---------------------------------------------------------------------------------------------------------------
# The worker: `python -m torch.distributed.run --nproc_per_node=N tests/test_tp.py MODE ARGS...`

def relative_error(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check_logits(path: str, rank: int, world: int):
    """This rank's shard against the whole model: logits of a plain pass and of prefill + decode, greedy tokens."""
    from anyprec import set_precision
    from generate import load_model
    for precision in (3, 8) if "anyprec" in path else (None,):
        whole = load_model(path, "cpu", torch.float32)
        sharded = load_model(path, "cpu", torch.float32, tp=True)
        assert sharded.layers[0].attention.n_head == whole.config.n_head // world
        assert all(t.is_contiguous() for t in sharded.state_dict().values())  # as the kernels read them
        name = f"{Path(path).parent.name}/{Path(path).name}"
        if precision is not None:
            set_precision(whole, precision)
            set_precision(sharded, precision)
            name += f" at {precision} bits"
        compare(whole, sharded, name, rank, world)


def compare(whole, sharded, name: str, rank: int, world: int):
    from generate import generate
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, whole.config.vocab_size, (2, 40), generator=g)
    error = relative_error(sharded(tokens), whole(tokens))
    assert error < 1e-5, f"{name}: logits differ by {error:.2e} relative"
    prompts = [tokens[0, :13].tolist(), tokens[1, :29].tolist()]  # ragged: rows at different positions
    expected, _ = generate(whole, prompts, 24)
    got, _ = generate(sharded, prompts, 24)
    assert got == expected, f"{name}: greedy tokens differ"
    cache_error = relative_error(sharded(tokens[:, :5], torch.arange(5)), whole(tokens[:, :5], torch.arange(5)))
    assert cache_error < 1e-5, f"{name}: logits with the KV cache differ by {cache_error:.2e} relative"
    if rank == 0:
        print(f"{name} on {world} ranks: logits within {max(error, cache_error):.1e} relative, "
              f"{sum(map(len, got))} greedy tokens identical")


def check_speculative(path: str, rank: int, world: int):
    """The sharded tiny model with the draft `path` replicated on every rank, then sharded too: sampled tokens equal
    the whole pair's, seeded alike."""
    import speculative
    from generate import generate, load_model
    target, prompts = str(TINY), [[1, 5, 9, 200, 31], [7, 3]]

    def speculate(model, draft):
        return generate(model, prompts, 24, decoder=speculative.decoder(model, draft, 4, temperature=0.8))
    torch.manual_seed(3)
    whole = load_model(target, "cpu", torch.float32)
    expected, stats = speculate(whole, load_model(path, "cpu", torch.float32))
    for draft_tp in (False, True):
        torch.manual_seed(3)
        sharded = load_model(target, "cpu", torch.float32, tp=True)
        got, _ = speculate(sharded, load_model(path, "cpu", torch.float32, tp=draft_tp))
        assert got == expected, f"speculative decoding with the draft {'sharded' if draft_tp else 'replicated'} differs"
    if rank == 0:
        print(f"speculative, draft replicated and sharded: {sum(map(len, got))} sampled tokens identical, "
              f"{sum(stats['accepted'][1:])} of {sum(stats['accepted'])} steps accepted drafts")


def check_compiled(path: str, rank: int, world: int):
    """Traced whole (fullgraph: the all-reduces go into the graph, no break), decode equals eager decode. aot_eager
    stops before code generation, which on 2 CPU cores takes minutes; scripts/gpu_check.sh runs the real thing."""
    import generate
    model = generate.load_model(path, "cpu", torch.float32, tp=True)
    prompts = [[1, 5, 9, 200, 31], [7, 3]]
    expected, _ = generate.generate(model, prompts, 16)
    generate.compile_step = lambda fn: torch.compile(fn, fullgraph=True, backend="aot_eager")
    generate.compile_prefill = lambda fn: torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    decoder = generate.plain_decoder(model, compile=True, compile_prefill_too=True)
    got, _ = generate.generate(model, prompts, 16, decoder=decoder)
    assert got == expected, "compiled decode differs from eager"
    if rank == 0:
        print(f"compiled prefill and decode: {sum(map(len, got))} tokens identical")


def check_cuda(path: str, rank, world: int):
    """NCCL all-reduces captured in the compiled decode's CUDA graph: tokens equal the whole model's eager ones. On
    a machine with one GPU the job has one rank, still over NCCL, so the collectives are in the graph all the same."""
    import torch.distributed as dist
    from generate import generate, load_model, plain_decoder
    one_gpu = rank is None  # maybe_init_dist leaves a job of one rank alone
    if one_gpu:
        dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
        rank, world = 0, 1
    torch.manual_seed(0)  # every rank the same input
    whole = load_model(path, "cuda", torch.float32)
    sharded = load_model(path, "cuda", torch.float32, tp=True)
    tokens = torch.randint(0, whole.config.vocab_size, (2, 40), device="cuda")
    error = relative_error(sharded(tokens), whole(tokens))
    assert error < 1e-4, f"logits differ by {error:.2e} relative"
    prompts = [tokens[0, :13].tolist(), tokens[1, :29].tolist()]
    expected, _ = generate(whole, prompts, 32)
    decoder = plain_decoder(sharded, compile=True, compile_prefill_too=True)
    for _ in range(2):  # the second run replays the captured graph
        got, _ = generate(sharded, prompts, 32, decoder=decoder)
        assert got == expected, "compiled tensor-parallel decode differs from the whole model's"
    if rank == 0:
        print(f"cuda on {world} ranks: logits within {error:.1e} relative, compiled decode identical")
    if one_gpu:
        dist.destroy_process_group()


def private_memory_mb() -> float:
    """Anonymous resident memory: what this process holds itself. Pages of the memory-mapped file are left out, as
    they sit in the page cache that every rank (and the next run) shares."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssAnon:")[1].split()[0]) / 1024  # KiB


def measure_memory(path: str, rank, world: int):
    """The most private memory loading the model adds (and running it once), polled every millisecond."""
    import threading
    import time
    from generate import load_model
    with torch.device("meta"):  # torch's one-time setup for the meta device (about 70 MB) is not the model's
        Transformer(ModelArgs(n_layer=1, n_head=1, dim=8, intermediate_size=8, vocab_size=8))
    before, peak, done = private_memory_mb(), [0.0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], private_memory_mb())
            time.sleep(0.001)

    thread = threading.Thread(target=poll)
    thread.start()
    model = load_model(path, "cpu", torch.float32, tp=rank is not None)
    model(torch.zeros(1, 8, dtype=torch.long))
    done.set()
    thread.join()
    peak[0] = max(peak[0], private_memory_mb())
    sys.stdout.write(json.dumps(dict(rank=rank, peak_mb=peak[0] - before)) + "\n")  # one write: ranks share a pipe


def worker(*args):
    """args: a mode (logits, compiled, memory, cuda), then the checkpoints it checks; another mode may follow. On CPU
    the quantized layers run the PyTorch reference: the checks hold the sharding's arithmetic to fp32, and the CPU
    kernels round their outputs to bf16, which a row-parallel split does per shard (tests/test_cpu_fast_paths.py
    checks those kernels, sharded too)."""
    import anyprec
    import quantize
    from tp import maybe_init_dist
    quantize.CPU_KERNELS = anyprec.CPU_KERNELS = False
    rank = maybe_init_dist("cuda" if args[0] == "cuda" else "cpu")
    checks = dict(logits=check_logits, compiled=check_compiled, speculative=check_speculative, memory=measure_memory,
                  cuda=check_cuda)
    world = torch.distributed.get_world_size() if rank is not None else 1
    for arg in args:
        if arg in checks:
            check = checks[arg]
        else:
            check(arg, rank, world)


if __name__ == "__main__":
    worker(*sys.argv[1:])
