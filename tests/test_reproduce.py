"""The scaled-down pipeline end to end on CPU (`reproduce.py --preset tiny` on a small corpus): it
writes the report, results.json and every plot, and a second run skips every stage. Part of the
normal suite on purpose (a CPU test runs the whole pipeline); about a minute on 2 cores."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(REPO))

import report  # noqa: E402
import reproduce  # noqa: E402
import torch  # noqa: E402

PLOTS = [
    "ppl_finetuned.png",
    "ppl_no_finetune.png",
    "retrieval_finetuned.png",
    "retrieval_no_finetune.png",
    "scaling_per_dimension.png",
    "temperature.png",
    "loss_curves.png",
]


def small_corpus(folder: Path, n_files: int = 16) -> Path:
    """The largest top-level modules of the running Python's standard library: long documents
    (thousands of tokens, as long-context evaluation needs), few enough to tokenize in seconds."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in stdlib.glob("*.py") if p.is_file()), key=lambda p: (-p.stat().st_size, p.name)
    )
    folder.mkdir(parents=True)
    for p in files[:n_files]:
        shutil.copy(p, folder / p.name)
    return folder


def run(args, cwd=REPO):
    proc = subprocess.run(
        [sys.executable, "reproduce.py", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_tiny_pipeline_end_to_end_then_resumes_with_nothing_to_do(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    args = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--data_source",
        str(corpus),
        "--data_dir",
        str(tmp_path / "data"),
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "results"),
    ]
    run(args)
    results = tmp_path / "results"
    for name in ["report.md", "results.json", *PLOTS]:
        assert (results / name).is_file() and (results / name).stat().st_size > 0, name
    res = json.loads((results / "results.json").read_text())
    assert set(res["no_finetune"]) == {
        "default",
        "linear",
        "ntk",
        "ntk_by_parts",
        "yarn",
        "dynamic",
        "dynamic_yarn",
    }
    assert set(res["finetuned"]) == {"default", "linear", "ntk", "yarn"}  # NTK-by-parts: no claim
    assert all(len(runs) == 2 for runs in res["finetuned"].values())  # seeds
    assert {m: len(runs) for m, runs in res["long"].items()} == {"yarn": 2, "linear": 2, "ntk": 2}
    assert len(res["scratch_long"]) == 1 and res["scratch_long"][0]["ppl"]
    long_runs = [f"short_long_{seed}" for seed in (0, 1)] + [
        f"short_long_{m}_{s}" for m in ("linear", "ntk") for s in (0, 1)
    ]
    plain_runs = ["plain/pretrain", *(f"plain/ft_{m}_0" for m in ("linear", "ntk", "yarn"))]
    fine_tunes = [f"ft_{m}_{seed}" for seed in (0, 1) for m in res["finetuned"]]
    assert sorted(res["train"]) == sorted(
        ["warmup", "pretrain", "scratch_long", *long_runs, *plain_runs, *fine_tunes]
    )
    claims = [c["claim"][:3] for c in res["claims"]]
    assert claims.count("2f.") == 4  # at 1 and 5 steps, from the curves
    assert [c["family"] for c in res["claims"]].count("ablation") == 4
    check_stage_order(list(res["stage_seconds"]))
    state = torch.load(tmp_path / "runs" / "ft_yarn_1" / "ckpt.pt", weights_only=True)
    assert (
        "optimizer" not in state and state["step"] == 2
    )  # nothing continues a finished fine-tune: 3x less to write
    for r in [*res["no_finetune"].values(), *sum(res["finetuned"].values(), [])]:
        # the same scored tokens at every context
        assert len({x["n_tokens"] for x in r["ppl"].values()}) == 1
        assert len({tuple(map(tuple, x["regions"])) for x in r["ppl"].values()}) == 1
    assert {m: list(runs[0]["ppl"]) for m, runs in res["finetuned"].items()} == {
        "default": ["128"],
        "linear": ["64", "128", "256"],
        "ntk": ["128"],
        "yarn": ["64", "128", "256"],
    }
    assert all([int(c) for c in r["ppl"]] == [128, 256] for r in sum(res["long"].values(), []))
    check_curves(res, tmp_path)
    # the sweep scores the tokens every evaluation scores: its a = 0.1 at s is YaRN at s, no
    # fine-tuning
    assert (
        res["temperature"]["2"]["a"]["0.1"]["nll"]
        == res["no_finetune"]["yarn"]["ppl"]["128"]["nll"]
    )
    assert res["leakage"]["scored_tokens"] == res["no_finetune"]["default"]["ppl"]["64"]["n_tokens"]
    assert 0 <= res["leakage"]["scored_pieces_seen_in_train"] <= 1
    # every stage ran, so every claim is decided (the tiny model cannot copy: its retrieval claims
    # say so)
    assert res["claims"] and all(
        c["held"] in ("yes", "no", "within noise", report.CONTROL_FAILED) for c in res["claims"]
    )
    text = (results / "report.md").read_text()
    assert "| claim | held | numbers |" in text and "## Ablation: a plain byte model" in text

    out = run(args)
    assert "[done]" not in out and out.count("[skip]") >= 10, out

    # a replication: every training seed shifted by the number of seeds, other documents, regions
    # and needles; the verdicts that are not 'within noise' in either run must agree
    replica = ["--runs", str(tmp_path / "runs_seed1"), "--out", str(tmp_path / "seed1")]
    run(args[:-4] + replica + ["--seed", "1"])
    other = json.loads((tmp_path / "seed1" / "results.json").read_text())
    assert report.agree(res["claims"], other["claims"]) == []
    assert other["replication_seed"] == 1
    for folder, shift in (("runs", 0), ("runs_seed1", 2)):
        names = ("warmup", "pretrain", "ft_yarn_0", "ft_linear_1", "plain/pretrain")
        configs = {
            name: json.loads((tmp_path / folder / name / "config.json").read_text())
            for name in names
        }
        seeds = {name: config["run"]["seed"] for name, config in configs.items()}
        assert seeds == {
            "warmup": 1337 + shift,
            "pretrain": 1337 + shift,
            "ft_yarn_0": shift,
            "ft_linear_1": 1 + shift,
            "plain/pretrain": 1337 + shift,
        }, folder
    mine, theirs = (r["no_finetune"]["default"]["ppl"]["64"] for r in (res, other))
    assert mine["regions"] != theirs["regions"]  # the needles: eval.retrieval's own seed


def check_stage_order(stages: list[str]):
    """The primary claims' inputs first: pretraining, its evaluations, then seed 0's fine-tunes,
    YaRN's first; the first seed's curves past 2.5x and the ablation last."""
    assert stages[:4] == ["data", "warmup", "pretrain", "evaluate nft_default"], stages
    order = [
        "finetune yarn s=2 at 128, seed 0, to step 1",
        "evaluate ft_yarn_0_1",
        "evaluate ft_yarn_0",
        "finetune linear s=2 at 128, seed 0, to step 5",
        "short_long: ntk s=4 at 128, seed 0",
        "temperature",
        "finetune yarn s=2 at 128, seed 1, to step 1",
        "scratch_long: plain RoPE from scratch at 128",
        "finetune yarn s=2 at 128, seed 0, to step 5",
        "plain: pretrain",
        "plain: evaluate ft_ntk_0",
    ]
    at = [stages.index(name) for name in order]
    assert at == sorted(at), stages


def check_curves(res: dict, tmp_path: Path):
    """A training loss at every step, and the held-out NLL at L' after 0 (no fine-tuning) and each
    curve step up to where the run went: YaRN to 2 (5 on the first seed), PI to 5 (on the first
    seed, up to 20 while above YaRN's level), NTK-aware to 2 (like PI on the first seed), RoPE
    scored at 2 only. Warm-up, then a constant lr: the step-2 model of a run that went on to 5
    (stopping at 1 and 2) is a 2-step run's."""
    points = {m: [list(x["val"]) for x in per_seed] for m, per_seed in res["curves"].items()}
    assert points["yarn"] == [["0", "1", "2", "5"], ["0", "1", "2"]]
    assert points["default"] == [["0", "2"]] * 2
    assert points["linear"][1] == ["0", "1", "2", "5"] and points["ntk"][1] == ["0", "1", "2"]
    assert all(p[:4] == ["0", "1", "2", "5"] for p in (points["linear"][0], points["ntk"][0]))
    for m, per_seed in res["curves"].items():
        for x in per_seed:
            assert len(x["train"]) == max(map(int, x["val"])), m  # a loss a step, across the pieces
            assert all(len(docs) == 3 for docs in x["doc_nll"].values())
    runs = tmp_path / "runs"
    job = reproduce.Job(
        reproduce.PRESETS["tiny"],
        "tiny",
        runs,
        tmp_path / "results",
        tmp_path / "data",
        "cpu",
        0,
        "test",
    )
    job.finetune("check", "yarn", 2, 0)
    reproduce.evaluate(
        job,
        reproduce.load_model(job, "check"),
        tmp_path / "check.json",
        reproduce.validation(job.data_dir),
        [128],
        [],
    )
    again = json.loads((tmp_path / "check.json").read_text())["ppl"]["128"]["nll"]
    assert again == res["curves"]["yarn"][0]["val"]["2"]
    lines = (runs / "ft_ntk_1" / "metrics.jsonl").read_text().splitlines()
    assert [e["step"] for e in map(json.loads, lines) if e["event"] == "train"] == [0, 1]
