"""The scaled-down pipeline end to end on CPU (`reproduce.py --preset tiny` on a small corpus): it writes the
report, results.json and every plot, and a second run skips every stage. Part of the normal suite on purpose
(a CPU test runs the whole pipeline); about a minute on 2 cores."""

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
import torch  # noqa: E402

PLOTS = ["ppl_finetuned.png", "ppl_no_finetune.png", "retrieval_finetuned.png", "retrieval_no_finetune.png",
         "scaling_per_dimension.png", "temperature.png", "loss_curves.png"]


def small_corpus(folder: Path, n_files: int = 16) -> Path:
    """The largest top-level modules of the running Python's standard library: long documents (thousands of
    tokens, as long-context evaluation needs), few enough to tokenize in seconds."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in stdlib.glob("*.py") if p.is_file()), key=lambda p: (-p.stat().st_size, p.name))
    folder.mkdir(parents=True)
    for p in files[:n_files]:
        shutil.copy(p, folder / p.name)
    return folder


def run(args, cwd=REPO):
    proc = subprocess.run([sys.executable, "reproduce.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_tiny_pipeline_end_to_end_then_resumes_with_nothing_to_do(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    args = ["--preset", "tiny", "--device", "cpu", "--data_source", str(corpus), "--data_dir", str(tmp_path / "data"),
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "results")]
    run(args)
    results = tmp_path / "results"
    for name in ["report.md", "results.json", *PLOTS]:
        assert (results / name).is_file() and (results / name).stat().st_size > 0, name
    res = json.loads((results / "results.json").read_text())
    assert set(res["no_finetune"]) == {"default", "linear", "ntk", "ntk_by_parts", "yarn", "dynamic", "dynamic_yarn"}
    assert set(res["finetuned"]) == {"default", "linear", "ntk", "ntk_by_parts", "yarn"}
    assert all(len(runs) == 2 for runs in res["finetuned"].values())  # seeds
    assert {m: len(runs) for m, runs in res["long"].items()} == {"yarn": 2, "linear": 2, "ntk": 2}
    assert len(res["scratch_long"]) == 1 and res["scratch_long"][0]["ppl"]
    long_runs = [f"short_long_{seed}" for seed in (0, 1)] + [f"short_long_{m}_{s}" for m in ("linear", "ntk")
                                                             for s in (0, 1)]
    budget_runs = [f"ft_{m}_0_4steps" for m in ("yarn", "linear", "ntk")]  # the first seed only
    assert list(res["train"]) == sorted(["warmup", "pretrain", "scratch_long", *long_runs, *budget_runs,
                                         *(f"ft_{m}_{seed}" for seed in (0, 1) for m in res["finetuned"])])
    assert all(res["train"][name]["steps"] == 4 for name in budget_runs)
    assert {m: [list(r["ppl"]) for r in runs] for m, runs in res["budgets"]["4"].items()} == \
        {m: [["128"]] for m in ("yarn", "linear", "ntk")}  # claim 2 at L' only
    assert [c["claim"][:3] for c in res["claims"]].count("2f.") == 2
    # the primary claims' inputs first: pretraining, its evaluations, then seed 0's fine-tunes, YaRN's first
    stages = list(res["stage_seconds"])
    assert stages[:4] == ["data", "warmup", "pretrain", "evaluate nft_default"], stages
    order = ["evaluate ft_yarn_0", "evaluate ft_yarn_0_half", "finetune linear s=2 at 128, seed 0",
             "short_long: ntk s=4 at 128, seed 0", "temperature", "finetune yarn s=2 at 128, seed 1",
             "scratch_long: plain RoPE from scratch at 128", "budget: yarn s=2 at 128 for 4 steps, seed 0",
             "evaluate ft_ntk_0_4steps"]
    assert [stages.index(name) for name in order] == sorted(stages.index(name) for name in order), stages
    state = torch.load(tmp_path / "runs" / "ft_yarn_0" / "ckpt.pt", weights_only=True)
    assert "optimizer" not in state and state["step"] == 2  # nothing continues a finished fine-tune: 3x less to write
    for r in [*res["no_finetune"].values(), *sum(res["finetuned"].values(), [])]:
        # the same scored tokens at every context (fine-tuned models at L, L' and 2L' only)
        assert len({x["n_tokens"] for x in r["ppl"].values()}) == 1
        assert len({tuple(map(tuple, x["regions"])) for x in r["ppl"].values()}) == 1
    assert all([int(c) for c in r["ppl"]] == [128, 256] for r in sum(res["long"].values(), []))
    # the loss curves: a training loss at every step, and the held-out NLL at L' at the start, midpoint and end
    for m, per_seed in res["curves"].items():  # a midpoint for the methods the claims name
        points = ["0", "1", "2"] if m in ("yarn", "linear", "ntk") else ["0", "2"]
        assert all(len(x["train"]) == 2 and list(x["val"]) == points for x in per_seed), m
    events = [json.loads(line) for line in (tmp_path / "runs" / "ft_ntk_1" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == [0, 1]
    # the sweep scores the tokens every evaluation scores: its a = 0.1 at s is YaRN at s, no fine-tuning
    assert res["temperature"]["2"]["a"]["0.1"]["nll"] == res["no_finetune"]["yarn"]["ppl"]["128"]["nll"]
    assert res["leakage"]["scored_tokens"] == res["no_finetune"]["default"]["ppl"]["64"]["n_tokens"]
    assert 0 <= res["leakage"]["scored_pieces_seen_in_train"] <= 1
    # every stage ran, so every claim is decided (the tiny model cannot copy: its retrieval claims say so)
    assert res["claims"] and all(c["held"] in ("yes", "no", "within noise", report.CONTROL_FAILED)
                                 for c in res["claims"])
    text = (results / "report.md").read_text()
    assert "| claim | held | numbers |" in text

    out = run(args)
    assert "[done]" not in out and out.count("[skip]") >= 10, out

    # another seed for every training run: the verdicts that are not 'within noise' in either run must agree
    run(args[:-4] + ["--runs", str(tmp_path / "runs_seed1"), "--out", str(tmp_path / "seed1"), "--seed", "1"])
    other = json.loads((tmp_path / "seed1" / "results.json").read_text())
    assert report.agree(res["claims"], other["claims"]) == []
