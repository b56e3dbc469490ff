"""bench.py --preset=smoke (every case, tiny shapes, CPU) and model.py's chunked head + loss, which
the T=32768 case needs."""

import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench
import checkpoint
import flags
import model
import reproduce

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# The chunked loss: same mean loss and gradients as the unchunked path


def tiny_model(vocab: int = 301) -> model.Transformer:
    torch.manual_seed(0)
    return model.Transformer(
        model.ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, block_size=64)
    )


def loss_and_grads(net, x, y, chunked: bool, autocast: bool = False):
    net.zero_grad(set_to_none=True)
    net.loss_chunk_threshold = 0 if chunked else 2**62
    net.loss_chunk_elements = (
        7 * net.config.vocab_size
    )  # 7 rows a chunk: 111 rows make 16 chunks, the last of 6
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = net(x, y)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}


def batch(vocab: int = 301):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (3, 37), generator=g)
    y = torch.randint(0, vocab, (3, 37), generator=g)
    y[0, :20] = -1  # ignored targets, covering whole chunks and parts of chunks
    y[2, 5] = -1
    return x, y


def test_chunked_loss_equals_unchunked_fp32():
    net, (x, y) = tiny_model(), batch()
    loss, grads = loss_and_grads(net, x, y, chunked=False)
    loss_c, grads_c = loss_and_grads(net, x, y, chunked=True)
    reference = F.cross_entropy(net(x).float().view(-1, 301), y.view(-1), ignore_index=-1)
    assert torch.allclose(loss, reference, rtol=0, atol=1e-6)
    assert torch.allclose(loss_c, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        assert torch.allclose(grads_c[name], grads[name], rtol=1e-5, atol=1e-6), name


def test_chunked_loss_bf16_autocast_dtypes_and_accuracy():
    """Under autocast the chunked path keeps the dtypes (fp32 loss, fp32 grads of fp32 weights) and
    is as close to the fp32 gradients as the unchunked bf16 path is."""
    net, (x, y) = tiny_model(), batch()
    _, exact = loss_and_grads(net, x, y, chunked=False)
    loss_u, grads_u = loss_and_grads(net, x, y, chunked=False, autocast=True)
    loss_c, grads_c = loss_and_grads(net, x, y, chunked=True, autocast=True)
    assert loss_c.dtype == torch.float32 and abs(loss_c.item() - loss_u.item()) < 1e-3
    for name in exact:
        assert grads_c[name].dtype == torch.float32
        scale = exact[name].abs().max()
        err_c = ((grads_c[name] - exact[name]).abs().max() / scale).item()
        err_u = ((grads_u[name] - exact[name]).abs().max() / scale).item()
        assert err_c < max(2 * err_u, 0.02), (name, err_c, err_u)


def test_chunked_loss_without_grad_and_all_ignored():
    net, (x, y) = tiny_model(), batch()
    net.loss_chunk_elements = 5 * 301
    with torch.no_grad():
        net.loss_chunk_threshold = 0
        chunked = net(x, y)
        net.loss_chunk_threshold = 2**62
        plain = net(x, y)
        assert torch.allclose(chunked, plain, rtol=0, atol=1e-6)
        net.loss_chunk_threshold = 0
        assert torch.isnan(
            net(x, torch.full_like(y, -1))
        )  # as F.cross_entropy's mean over no targets


def test_chunking_threshold_default():
    """Unchunked at the benchmark's T=1024 x 16 and T=8192 x 2 (824M logits); chunked at T=32768
    (1.65G)."""
    vocab = 50304
    assert 16 * 1024 * vocab <= model.Transformer.loss_chunk_threshold < 32768 * vocab


# --------------------------------------------------------------------------------------------------
# bench.py --preset=smoke


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "bench.py", "--preset=smoke", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_smoke_runs_every_case_and_prints_the_table(smoke_report):
    report, stdout = smoke_report
    assert "| case | a | a tokens/s | b | b tokens/s | a / b |" in stdout and "wrote" in stdout
    assert (
        "| sample_B1_compiled | compiled |" in stdout and "| sample_B1_compiled | ours |" in stdout
    )
    for key in (
        "command",
        "preset",
        "device",
        "torch",
        "transformers",
        "git_commit",
        "model",
        "matmul_peak",
        "finished_utc",
    ):
        assert key in report, key
    assert report["preset"] == "smoke" and "--preset=smoke" in report["command"]
    assert report["model"] == json.loads(
        json.dumps(asdict(reproduce.PRESETS["tiny"]))
    )  # tuples as JSON lists
    assert report["matmul_peak"]["tflops"] > 0 and len(report["load_average_end"]) == 3


def test_smoke_runs_every_case_of_both_models(smoke_report):
    report, _ = smoke_report
    assert list(report["cases"]) == [c.name for c in bench.PRESETS["smoke"][1]]
    hf = report["transformers"] is not None
    for (name, case), spec in zip(report["cases"].items(), bench.PRESETS["smoke"][1]):
        assert case["status"] == "ok", (name, case)
        contenders = [w for w in spec.contenders if hf or w != "hf"]
        assert list(case["results"]) == contenders
        for impl in contenders:
            r = case["results"][impl]
            assert r["status"] == "ok" and r["tokens_per_s"] > 0 and len(r["round_s"]) >= 1, (
                name,
                impl,
                r,
            )
        for a, b in itertools.combinations(
            spec.contenders, 2
        ):  # every pair's speed ratio, None without HF
            assert (
                (case[f"{a}_over_{b}"] > 0)
                if hf or "hf" not in (a, b)
                else case[f"{a}_over_{b}"] is None
            )
    assert report["cases"]["sample_follow"]["rope"]["type"] == "dynamic_yarn"
    assert list(report["cases"]["sample_follow"]["results"]) == ["compiled", "ours", "capacity"]


def test_smoke_training_and_sampling_fields(smoke_report):
    report, _ = smoke_report
    cases = report["cases"]
    for name in ("train_T64", "train_T128_yarn", "train_T256_yarn"):
        ours = cases[name]["results"]["ours"]
        assert cases[name]["flops_per_token"] > 0 and ours["mfu"] > 0, name
    assert cases["train_T64"]["rope"]["type"] == "default"
    assert (
        cases["train_T128_yarn"]["rope"]["type"] == "yarn"
        and cases["train_T128_yarn"]["rope"]["factor"] == 2.0
    )
    assert (
        cases["train_T256_yarn"]["results"]["ours"]["chunked_loss"] is True
    )  # the T=32768 code path
    assert cases["train_T64"]["results"]["ours"]["chunked_loss"] is False
    sample = cases["sample_B1"]
    assert sample["new_tokens"] == 8 and sample["results"]["ours"]["tokens_per_round"] == 8
    assert sample["weights"] == "random" and sample["results"]["ours"]["first_token_s"] > 0
    if report["transformers"] is not None:
        assert sample["tokens_match"] == {
            "ours_hf": 1.0
        }  # the same weights, fp32, greedy: the same tokens


def test_smoke_compiled_case_reports_the_compilation_and_matches_eager(smoke_report):
    """The compiled contender (the GPU bench's last case, rehearsed here on CPU): the same greedy
    tokens as eager decoding, and the cost of compiling: its first generation's excess over a timed
    one, and the break-even."""
    case = smoke_report[0]["cases"]["sample_B1_compiled"]
    compiled, eager = case["results"]["compiled"], case["results"]["ours"]
    assert case["tokens_match"]["compiled_ours"] == 1.0
    assert compiled["first_call_s"] > compiled["round_s"][0] and case["compile_s"] > 0
    assert case["compile_s"] == round(
        compiled["first_call_s"] - statistics.median(compiled["round_s"]), 2
    )
    saved = (statistics.median(eager["round_s"]) - statistics.median(compiled["round_s"])) / case[
        "new_tokens"
    ]
    assert case["break_even_tokens"] == (round(case["compile_s"] / saved) if saved > 0 else None)


def test_the_gpu_and_cpu_presets_take_the_main_jobs_shapes():
    """The GPU case list is the one scripts/gpu_run.sh runs; the CPU one gives the README's
    ratios."""
    for preset, shape, names in (
        (
            "gpu",
            "gpu",
            [
                "train_T1024",
                "train_T1024_yarn",
                "train_T8192_yarn",
                "train_T32768_yarn",
                "sample_B1",
                "sample_B1_compiled",
            ],
        ),
        ("cpu", "cpu", ["train_T512", "sample_B1", "sample_B8", "sample_follow"]),
    ):
        assert (
            bench.PRESETS[preset][0] == shape
            and [c.name for c in bench.PRESETS[preset][1]] == names
        )
        p = reproduce.PRESETS[shape]
        for case in bench.PRESETS[preset][1]:
            cfg = bench.configs(p, case)
            assert (cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.n_head) == (
                p.vocab_size,
                p.d_model,
                p.n_layer,
                p.n_head,
            )
            assert cfg.rope.type == (
                "dynamic_yarn" if case.dynamic else "yarn" if case.yarn else "default"
            )
            if case.yarn:
                assert cfg.rope.factor * cfg.rope.original_context == case.T
    for case in (
        bench.PRESETS["gpu"][1] if importlib.util.find_spec("transformers") else ()
    ):  # both build at the GPU shapes
        cfg = bench.configs(reproduce.PRESETS["gpu"], case)
        ours, theirs = (
            bench.build(w, cfg, torch.device("meta"), torch.bfloat16) for w in ("ours", "hf")
        )  # no memory
        assert ours.num_params() == theirs.num_parameters() == 25_862_656, case.name
        assert theirs.config.max_position_embeddings == cfg.block_size >= case.T + case.new_tokens
    cpu_train = bench.PRESETS["cpu"][1][0]
    assert (cpu_train.T, cpu_train.B) == (
        reproduce.PRESETS["cpu"].L,
        reproduce.PRESETS["cpu"].pretrain_batch,
    )
    assert bench.PRESETS["cpu"][1][1].T == 128 and bench.PRESETS["cpu"][1][1].new_tokens == 128
    assert [c.name for c in bench.PRESETS["gpu"][1] if "compiled" in c.contenders] == [
        "sample_B1_compiled"
    ]
    assert bench.PRESETS["gpu"][1][-1].contenders == (
        "compiled",
        "ours",
        "hf",
    )  # last: a cut there loses only it


def test_failures_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """An OOM in one model keeps the other's numbers; a case that raises is recorded and the next
    case runs; the JSON on disk has every case."""
    train_step, run_case = bench.train_step, bench.run_case

    def oom_for_hf(which, *args, **kwargs):
        if which == "hf":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return train_step(which, *args, **kwargs)

    def broken(p, case, *args, **kwargs):
        if case.name == "train_T128_yarn":
            raise RuntimeError("simulated")
        return run_case(p, case, *args, **kwargs)

    monkeypatch.setattr(bench, "train_step", oom_for_hf)
    monkeypatch.setattr(bench, "run_case", broken)
    out = tmp_path / "b.json"
    threads = torch.get_num_threads()
    try:
        bench.main(
            [
                "--preset=smoke",
                "--cases=train_T64,train_T128_yarn,sample_B1",
                "--rounds=1",
                f"--out={out}",
            ]
        )
    finally:
        torch.set_num_threads(threads)  # --smoke sets 1 for its process
    report = json.loads(out.read_text())
    assert list(report["cases"]) == ["train_T64", "train_T128_yarn", "sample_B1"]
    short = report["cases"]["train_T64"]
    assert short["results"]["ours"]["tokens_per_s"] > 0 and short["ours_over_hf"] is None
    if report["transformers"] is not None:
        assert "OutOfMemoryError" in short["results"]["hf"]["error"]
    assert report["cases"]["train_T128_yarn"]["status"] == "error"
    assert "simulated" in report["cases"]["train_T128_yarn"]["error"]
    assert report["cases"]["sample_B1"]["results"]["ours"]["tokens_per_s"] > 0


def test_ours_only(tmp_path):
    threads = torch.get_num_threads()
    try:
        report = bench.main(
            ["--preset=smoke", "--hf=false", "--cases=sample_B1", f"--out={tmp_path / 'b.json'}"]
        )
    finally:
        torch.set_num_threads(threads)
    assert report["hf"] is False and list(report["cases"]["sample_B1"]["results"]) == ["ours"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cases=train_T64,nope"], "unknown ['nope']"),
        (["--preset=tpu"], "--preset must be"),
        (["--threads=-1"], "must be >= 0"),
        (["--rounds=two"], "--rounds expects an int"),
        (["--no_such_flag=1"], "unknown option"),
        *([] if torch.cuda.is_available() else [(["--preset=gpu"], "CUDA is not available")]),
    ],
)
def test_bad_input_is_an_error_with_exit_2(args, message, capsys):
    assert flags.cli(bench.main, ["--preset=smoke", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_trained_checkpoint_gives_the_sampling_cases_their_weights_and_a_text_prompt(tmp_path):
    """--ckpt: ours and HF decode with the checkpoint's weights and shape, from a prompt of real
    text (bench.py's own, in the checkpoint's tokenizer); the training cases keep random weights."""
    torch.manual_seed(3)
    net = model.Transformer(
        model.ModelConfig(vocab_size=320, n_layer=1, n_head=2, d_model=32, block_size=64)
    )
    path = tmp_path / "ckpt.pt"
    checkpoint.save(
        {
            "model_config": net.config.to_dict(),
            "model": net.state_dict(),
            "step": 7,
            "tokenizer": "bytes",
        },
        path,
    )
    threads = torch.get_num_threads()
    try:
        report = bench.main(
            [
                "--preset=smoke",
                "--cases=train_T64,sample_B1",
                "--rounds=1",
                f"--ckpt={path}",
                f"--out={tmp_path / 'b.json'}",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    sample, train = report["cases"]["sample_B1"], report["cases"]["train_T64"]
    assert (
        sample["status"] == "ok"
        and sample["weights"] == f"{path} (step 7)"
        and train["weights"] == "random"
    )
    prompt = bench.prompts(bench.PRESETS["smoke"][1][3], 320, {"tokenizer": "bytes"})
    assert prompt.tolist() == [
        list((ROOT / "bench.py").read_bytes()[:16])
    ]  # bytes: ids are the file's bytes
    if report["transformers"] is not None:
        assert sample["tokens_match"] == {"ours_hf": 1.0} and sample["ours_over_hf"] > 0
    assert flags.cli(bench.main, ["--preset=smoke", f"--ckpt={tmp_path / 'none.pt'}"]) == 2
