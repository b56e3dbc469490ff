"""Speed of this repository's Transformer (model.py) against Hugging Face's LlamaForCausalLM with
the same shape and the same weights, side by side in one process and one JSON.

    python bench.py --preset=cpu --threads=1 --ckpt=CKPT \\
        --out=results/bench_cpu.json                  # the README's (~4 min)
    python bench.py --preset=gpu --out=bench.json     # one GPU (scripts/gpu_run.sh), ~2 min
    python bench.py --preset=smoke --out=/tmp/s.json  # tiny shapes on CPU, every code path, < 1 min

The cases (PRESETS) use the main job's model shapes. train_T<T>[_yarn]: training steps (forward with
loss, backward, AdamW) on random tokens, bf16 autocast on CUDA, YaRN at s = T / L. sample_*: greedy
generation with a KV cache, tokens/s of new tokens with the prefill in the time. A case's
contenders: ours (eager), compiled (ours with generate.compiled_step), hf (LlamaForCausalLM),
capacity (ours under that rule; the others follow). They take turns round by round; tokens/s is the
median over rounds, a/b the median of per-round ratios, for every pair. compile_s: the compiled
contender's first generation less a timed one; break_even_tokens: the new tokens that repay it.
--ckpt: a trained checkpoint's weights, shape and text prompts (this file's) for the sampling cases.
A failure (an OOM) is recorded and the run goes on; the JSON is rewritten after every case.
"""

import gc
import importlib.metadata
import importlib.util
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from itertools import combinations
from pathlib import Path

import torch

import checkpoint
import flags
import generate
import hf
import model
import reproduce
from data.tokenizer import get_tokenizer
from rope import RopeConfig
from system import check_writable, dtype_name, pick_device, provenance, write_json


@dataclass(frozen=True)
class Case:
    name: str
    T: int  # training: the sequence length; sampling: the prompt's
    B: int
    yarn: bool = False  # YaRN at s = T / L
    new_tokens: int = 0  # > 0: a sampling case
    rounds: int = 5
    steps: int = 1  # training steps per timed round
    warmup: int = 2  # untimed steps (or generations) first
    force_chunked: bool = (
        False  # ours takes the chunked head + loss whatever the size (smoke: that code path)
    )
    dynamic: bool = False  # Dynamic YaRN (L the model's), decoding under the follow rule (model.py)
    contenders: tuple[str, ...] = ("ours", "hf")  # ours, compiled, hf, capacity (module docstring)


COMPILED = ("compiled", "ours", "hf")
PRESETS = {  # preset: (the reproduce.PRESETS entry for the model's shape, cases)
    "gpu": (
        "gpu",
        (
            Case("train_T1024", 1024, 16, steps=5, rounds=4, warmup=3),
            Case("train_T1024_yarn", 1024, 16, yarn=True, steps=5, rounds=4, warmup=3),
            Case("train_T8192_yarn", 8192, 2, yarn=True, steps=3, rounds=4),
            Case("train_T32768_yarn", 32768, 1, yarn=True, rounds=1, warmup=1),  # does it fit
            Case("sample_B1", 512, 1, new_tokens=256, rounds=3, warmup=1),
            # last: its compilation is the longest part of the stage, and a cut there loses only
            # this case
            Case(
                "sample_B1_compiled",
                512,
                1,
                new_tokens=256,
                rounds=3,
                warmup=1,
                contenders=COMPILED,
            ),
        ),
    ),
    "cpu": (
        "cpu",
        (
            Case(
                "train_T512", 512, 8, rounds=15
            ),  # the cpu preset's pretraining step, T = L, batch 8
            Case("sample_B1", 128, 1, new_tokens=128, rounds=15, warmup=1, contenders=COMPILED),
            Case("sample_B8", 128, 8, new_tokens=128, rounds=7, warmup=1, contenders=COMPILED),
            Case(
                "sample_follow",
                100,
                1,
                new_tokens=1948,
                dynamic=True,
                rounds=5,
                warmup=1,
                contenders=("compiled", "ours", "capacity"),
            ),
        ),
    ),  # to 4L: re-prefills at 2L and 4L
    "smoke": (
        "tiny",
        (
            Case("train_T64", 64, 2, rounds=2, warmup=1),
            Case("train_T128_yarn", 128, 2, yarn=True, rounds=2, warmup=1),
            Case("train_T256_yarn", 256, 1, yarn=True, rounds=1, warmup=1, force_chunked=True),
            Case("sample_B1", 16, 1, new_tokens=8, rounds=2, warmup=1),
            Case(
                "sample_B1_compiled", 8, 1, new_tokens=120, rounds=2, warmup=1, contenders=COMPILED
            ),
            Case(
                "sample_follow",
                8,
                1,
                new_tokens=120,
                dynamic=True,
                rounds=1,
                warmup=1,  # the same graph
                contenders=("compiled", "ours", "capacity"),
            ),
        ),
    ),
}


@dataclass(frozen=True)
class BenchConfig:
    """bench.py's settings.

    preset   gpu, cpu or smoke; auto = gpu where CUDA is available, else cpu
    out      the JSON report, rewritten after every case
    cases    comma-separated case names to run; empty = every case of the preset
    device   auto = cuda for the gpu preset (an error without CUDA), cpu for cpu and smoke
    hf       false: our model only
    threads  torch threads on CPU; 0 = torch's default
    rounds   timed rounds per case; 0 = the case's own
    ckpt     sampling cases: a trained checkpoint's weights and shape (HF: without prev_tokens);
             empty = random
    """

    preset: str = "auto"
    out: str = "bench.json"
    cases: str = ""
    device: str = "auto"
    hf: bool = True
    threads: int = 0
    rounds: int = 0
    ckpt: str = ""

    def __post_init__(self):
        flags.check_types(self)
        if self.preset not in ("auto", *PRESETS):
            raise ValueError(f"--preset must be auto, {', '.join(PRESETS)}, got {self.preset!r}")
        if self.threads < 0 or self.rounds < 0:
            raise ValueError(
                f"--threads and --rounds must be >= 0, got {self.threads} and {self.rounds}"
            )


def resolve(cfg: BenchConfig) -> tuple[str, torch.device, list[Case]]:
    """(preset, device, cases) for a config; a ValueError for an unknown case name or device."""
    preset = cfg.preset if cfg.preset != "auto" else "gpu" if torch.cuda.is_available() else "cpu"
    device = pick_device(
        cfg.device if cfg.device != "auto" else "cuda" if preset == "gpu" else "cpu"
    )
    known = PRESETS[preset][1]
    wanted = [c for c in cfg.cases.split(",") if c]
    unknown = set(wanted) - {c.name for c in known}
    if unknown:
        raise ValueError(
            f"--cases: unknown {sorted(unknown)} for preset {preset}; known: "
            f"{', '.join(c.name for c in known)}"
        )
    return preset, torch.device(device), [c for c in known if not wanted or c.name in wanted]


# Models: ours and Hugging Face's with the same weights
def configs(
    p: reproduce.Preset, case: Case, base: model.ModelConfig | None = None
) -> model.ModelConfig:
    """The case's model: the preset's shape, or a checkpoint's (base), with the case's RoPE and room
    for its length."""
    L = base.block_size if base else p.L
    rope_cfg = (
        RopeConfig(type="yarn", factor=case.T / L, original_context=L)
        if case.yarn
        else RopeConfig()
    )
    rope_cfg = RopeConfig(type="dynamic_yarn", original_context=L) if case.dynamic else rope_cfg
    base = base or model.ModelConfig(
        vocab_size=p.vocab_size, n_layer=p.n_layer, n_head=p.n_head, d_model=p.d_model
    )
    return replace(base, block_size=max(L, case.T + case.new_tokens), rope=rope_cfg)


def build(which: str, cfg: model.ModelConfig, device, dtype, weights: dict | None = None):
    """Ours (seeded, or with the given weights), or LlamaForCausalLM with hf.hf_config's LlamaConfig
    and ours' weights (hf.hf_tensors), built in `dtype` (its rotary inv_freq stays fp32, as
    from_pretrained leaves it)."""
    torch.manual_seed(0)
    with torch.device(device):
        ours = model.Transformer(cfg)
    if weights is not None:
        ours.load_state_dict(weights)
    if which != "hf":
        return ours.to(device=device, dtype=dtype)
    from transformers import LlamaConfig, LlamaForCausalLM

    keys = {
        k: v
        for k, v in hf.hf_config(cfg).items()
        if k not in (hf.RECORD_KEY, "architectures", "model_type")
    }
    with torch.device(device):
        net = LlamaForCausalLM._from_config(
            LlamaConfig(**keys, attn_implementation="sdpa"), dtype=dtype
        )
    net.load_state_dict(hf.hf_tensors(ours.state_dict(), cfg), strict=False)
    assert net.lm_head.weight is net.model.embed_tokens.weight, (
        "Hugging Face's model did not tie its embeddings"
    )
    net.generation_config.eos_token_id, net.generation_config.pad_token_id = None, 0
    return net.to(device)


def train_step(which: str, net, case: Case, device):
    """`net`'s training step as a function: random tokens, forward with loss, backward, AdamW."""
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randint(0, net.config.vocab_size, (case.B, case.T), generator=g).to(device)
        for _ in range(2)
    )
    if which == "ours" and case.force_chunked:
        net.loss_chunk_threshold = 0
    opt = torch.optim.AdamW(
        net.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = (
                net(x, y) if which == "ours" else net(input_ids=x, labels=x, use_cache=False).loss
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def prompts(case: Case, vocab_size: int, state: dict | None) -> torch.Tensor:
    """(B, T) prompt ids: random ones, or with a checkpoint (its state) consecutive pieces of this
    file's text."""
    if state is None:
        return torch.randint(
            0, vocab_size, (case.B, case.T), generator=torch.Generator().manual_seed(2)
        )
    ids = get_tokenizer(state.get("tokenizer", "gpt2")).encode_ordinary(
        Path(__file__).read_text(encoding="utf-8")
    )
    return torch.tensor(ids[: case.B * case.T]).view(case.B, case.T)


def generation(which: str, net, case: Case, prompt, outputs: dict, first_token: dict):
    """One greedy generation of case.new_tokens after the prompt, as a function; its tokens in
    outputs, and for ours the seconds to its first token (the prefill) in first_token."""

    @torch.no_grad()
    def run():
        if which == "hf":
            out = net.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=case.new_tokens,
                min_new_tokens=case.new_tokens,
                use_cache=True,
            )
            outputs[which] = out[:, case.T :]
            return
        rule = "capacity" if which == "capacity" else "follow"
        t0, tokens = time.perf_counter(), []
        compile = which == "compiled"
        for token in generate.generate(net, prompt, case.new_tokens, rule=rule, compile=compile):
            tokens.append(token)
            if len(tokens) == 1:
                sync(prompt.device)
                first_token[which] = time.perf_counter() - t0
        outputs[which] = torch.stack(tokens, dim=1)

    return run


# Measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_record(exc: BaseException) -> dict:
    return {
        "status": "error",
        "error": f"{type(exc).__name__}: {str(exc)[:600]}",
        "traceback_tail": traceback.format_exc().strip().splitlines()[-6:],
    }


def prepare(make, case: Case, device) -> tuple[object, dict]:
    """(fn, record): make() builds a model and returns its round function, run case.warmup times
    untimed here; the record has the first call's seconds (a compilation included) and the peak
    memory on CUDA. (None, error record) if building or warming up failed."""
    cuda = device.type == "cuda"
    gc.collect()  # the previous case's models
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    t0 = time.perf_counter()
    try:
        fn, calls = make(), []
        for _ in range(case.warmup):
            t1 = time.perf_counter()
            fn()
            sync(device)
            calls.append(time.perf_counter() - t1)
    except Exception as e:  # an OOM or a missing kernel: recorded, and the other model still runs
        return None, error_record(e)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if cuda else None
    return fn, {
        "status": "ok",
        "build_and_warmup_s": round(time.perf_counter() - t0, 2),
        "first_call_s": round(calls[0], 3) if calls else None,
        "peak_mem_gb": peak,
    }


def alternate(fns: dict, rounds: int, repeat: int, device) -> dict[str, list[float]]:
    """Seconds per round for each function, the functions taking turns round by round; a round calls
    fn repeat times. A function that raises is dropped from the later rounds with its error kept
    under its name."""
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in list(fns.items())[
            :: 1 if r % 2 == 0 else -1
        ]:  # who goes first alternates too
            sync(device)
            t0 = time.perf_counter()
            try:
                for _ in range(repeat):
                    fn()
                sync(device)
            except Exception as e:
                times[name] = error_record(e)
                del fns[name]
                continue
            times[name].append(time.perf_counter() - t0)
    return times


def matmul_peak(device, n: int) -> dict:
    """FLOP/s of an n x n x n matmul, bf16 on CUDA, fp32 on CPU: the MFU denominator."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = alternate({"mm": lambda: a @ b}, 5, 3 if device.type == "cuda" else 1, device)["mm"]
    flops = 2 * n**3 * (3 if device.type == "cuda" else 1) / statistics.median(times)
    return {"n": n, "dtype": dtype_name(dtype), "tflops": flops / 1e12, "flops": flops}


def run_case(
    p: reproduce.Preset,
    case: Case,
    cfg: BenchConfig,
    device,
    peak: float | None,
    state: dict | None = None,
) -> dict:
    """The case's contenders (ours and HF, ours compiled, ours under the capacity rule): build and
    warm up each, then timed rounds taking turns. state: --ckpt's checkpoint, whose weights the
    sampling cases take."""
    sampling = case.new_tokens > 0
    state = state if sampling else None
    mcfg = configs(p, case, model.ModelConfig.from_dict(state["model_config"]) if state else None)
    dtype = torch.bfloat16 if sampling and device.type == "cuda" else torch.float32
    prompt = prompts(case, mcfg.vocab_size, state).to(device) if sampling else None
    outputs, first_token, fns, results = {}, {}, {}, {}
    for which in [w for w in case.contenders if cfg.hf or w != "hf"]:

        def make(which=which):
            net = build(which, mcfg, device, dtype, state and state["model"])
            if sampling:
                return generation(which, net, case, prompt, outputs, first_token)
            return train_step(which, net, case, device)

        fn, results[which] = prepare(make, case, device)
        if fn is not None:
            fns[which] = fn
    times = alternate(fns, cfg.rounds or case.rounds, 1 if sampling else case.steps, device)
    tokens = case.B * (case.new_tokens if sampling else case.T * case.steps)
    with torch.device("meta"):  # the shape's FLOPs, without allocating it
        flops = model.Transformer(model.ModelConfig.from_dict({**mcfg.to_dict(), "block_size": 8}))
    flops = flops.flops_per_token(case.T)
    for which, t in times.items():
        if isinstance(t, dict):  # it failed in a timed round
            results[which] = t
        elif t:
            tps = tokens / statistics.median(t)
            results[which].update(
                tokens_per_s=tps,
                round_s=[round(s, 5) for s in t],
                tokens_per_round=tokens,
                first_token_s=first_token.get(which),
            )
            if not sampling:
                results[which]["mfu"] = flops * tps / peak if peak else None
    if not sampling and results["ours"].get("status") == "ok":
        big = case.B * case.T * p.vocab_size > model.Transformer.loss_chunk_threshold
        results["ours"]["chunked_loss"] = case.force_chunked or big
    record = {
        "T": case.T,
        "B": case.B,
        "new_tokens": case.new_tokens or None,
        "dtype": dtype_name(dtype),
        "rope": asdict(mcfg.rope),
        "flops_per_token": None if sampling else flops,
        "weights": f"{cfg.ckpt} (step {state.get('step')})" if state else "random",
        "results": results,
    }
    ok = {w for w, t in times.items() if isinstance(t, list) and t}
    for a, b in combinations(case.contenders, 2):
        both = {a, b} <= ok
        record[f"{a}_over_{b}"] = (
            statistics.median(tb / ta for ta, tb in zip(times[a], times[b])) if both else None
        )
        if sampling and {a, b} <= outputs.keys():  # the share of greedy tokens that agree
            same = (outputs[a].cpu() == outputs[b].cpu()).float().mean().item()
            record.setdefault("tokens_match", {})[f"{a}_{b}"] = same
    if {"compiled", "ours"} <= ok and results["compiled"].get("first_call_s") is not None:
        record.update(compile_cost(results["compiled"], results["ours"], case.new_tokens))
    return record


def compile_cost(compiled: dict, eager: dict, new_tokens: int) -> dict:
    """compile_s: the compiled contender's first generation less a timed one (the compilation; 0 if
    an earlier case compiled the same graph); break_even_tokens: new tokens after which it is repaid
    against eager decoding."""
    compile_s = round(
        max(0.0, compiled["first_call_s"] - statistics.median(compiled["round_s"])), 2
    )
    saved = (
        statistics.median(eager["round_s"]) - statistics.median(compiled["round_s"])
    ) / new_tokens  # s a token
    return {
        "compile_s": compile_s,
        "break_even_tokens": round(compile_s / saved) if saved > 0 else None,
    }


# The run
def header(cfg: BenchConfig, preset: str, device, argv) -> dict:
    return {
        **provenance(str(device), argv),
        "command": " ".join(["python bench.py", *argv]),
        "preset": preset,
        "cuda": torch.version.cuda,
        "hf": cfg.hf,
        "threads": torch.get_num_threads(),
        "transformers": importlib.metadata.version("transformers") if cfg.hf else None,
        "load_average_start": os.getloadavg(),
        "model": asdict(reproduce.PRESETS[PRESETS[preset][0]]),
        "matmul_peak": None,
        "cases": {},
    }


def ratios(record: dict) -> dict:
    """{'a/b': a's speed over b's} for every pair of a case's contenders (None where one failed)."""
    return {key.replace("_over_", "/"): v for key, v in record.items() if "_over_" in key}


def table(report: dict) -> str:
    """The report as a markdown table: a row per pair of contenders of each case."""
    rows = [
        "| case | a | a tokens/s | b | b tokens/s | a / b | peak GB a / b | MFU a |",
        "|---" * 8 + "|",
    ]
    for name, c in report["cases"].items():
        r = c.get("results", {})

        def get(w, k, f):
            return format(r[w][k], f) if r.get(w, {}).get(k) is not None else "-"

        for pair, ratio in ratios(c).items() or {"-/-": None}.items():
            a, b = pair.split("/")
            rows.append(
                f"| {name} | {a} | {get(a, 'tokens_per_s', ',.0f')} | {b} | "
                f"{get(b, 'tokens_per_s', ',.0f')} | "
                f"{f'{ratio:.2f}x' if ratio else c.get('error', '-')[:60]} | "
                f"{get(a, 'peak_mem_gb', '.2f')} / {get(b, 'peak_mem_gb', '.2f')} | "
                f"{get(a, 'mfu', '.1%')} |"
            )
    return "\n".join(rows)


def main(argv) -> dict:
    cfg = flags.build(
        BenchConfig,
        flags.parse(argv, flags.flag_table((BenchConfig, "")), "python bench.py", __doc__),
    )
    preset, device, cases = resolve(cfg)
    check_writable(cfg.out, "--out", folder=False)
    cfg = replace(cfg, hf=cfg.hf and importlib.util.find_spec("transformers") is not None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif preset == "smoke":
        torch.set_num_threads(
            1
        )  # tiny shapes gain nothing from threads, and waiting ones crawl on a shared CPU
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    p = reproduce.PRESETS[PRESETS[preset][0]]
    state = checkpoint.load(cfg.ckpt) if cfg.ckpt else None
    if state is not None:
        checkpoint.model_from_state(
            state
        )  # a config or weights that do not fit: an error before any case runs
    report = header(cfg, preset, device, argv)
    print(
        f"bench: {report['device']}, torch {report['torch']}, transformers "
        f"{report['transformers']}, {report['threads']} threads, cases {[c.name for c in cases]}",
        flush=True,
    )
    try:
        report["matmul_peak"] = matmul_peak(device, {"gpu": 8192, "cpu": 1024}.get(preset, 256))
    except Exception as e:
        report["matmul_peak"] = error_record(e)
    write_json(cfg.out, report)
    for case in cases:
        t0 = time.perf_counter()
        try:
            record = {
                "status": "ok",
                **run_case(p, case, cfg, device, report["matmul_peak"].get("flops"), state),
            }
        except Exception as e:
            record = error_record(e)
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        report["cases"][case.name] = record
        print(f"[{case.name}] speed ratios {ratios(record)}, {record['wall_s']} s", flush=True)
        write_json(cfg.out, report)
    report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["load_average_end"] = (
        os.getloadavg()
    )  # 1, 5, 15 minutes: other work on the machine meanwhile
    write_json(cfg.out, report)
    print(table(report) + f"\nwrote {cfg.out}", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(flags.cli(main))
