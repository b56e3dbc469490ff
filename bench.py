"""Speed of this repository's Transformer (model.py) against Hugging Face's LlamaForCausalLM with the same shape and
the same weights, side by side in one process and one JSON.

    python bench.py --preset=cpu --out=results/bench_cpu.json   # the CPU ratios in the README (~20 s, 2 cores)
    python bench.py --preset=gpu --out=bench.json               # one GPU, ~1 min (scripts/gpu_run.sh runs it)
    python bench.py --preset=smoke --out=/tmp/s.json            # tiny shapes on CPU, every code path, seconds

The cases (PRESETS) use the main job's model shapes. train_T<T>[_yarn]: training steps (forward with loss,
backward, AdamW) on random tokens, bf16 autocast on CUDA, YaRN at s = T / L. sample_B1: greedy generation at
batch 1 with a KV cache, tokens/s of new tokens with the prefill in the time. The models take turns round by
round; tokens/s is the median over rounds, ours/HF the median of per-round ratios. A failure (an OOM) is
recorded and the run goes on; the JSON is rewritten after every case.
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

import torch

import flags
import hf
import model
import reproduce
from rope import RopeConfig
from system import dtype_name, pick_device, provenance, write_json


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
    force_chunked: bool = False  # ours takes the chunked head + loss whatever the size (smoke: that code path)
    rules: bool = False  # Dynamic YaRN: ours decoding under the follow rule against capacity (model.py), not HF


PRESETS = {  # preset: (the reproduce.PRESETS entry for the model's shape, cases)
    "gpu": ("gpu", (Case("train_T1024", 1024, 16, steps=5, rounds=4, warmup=3),
                    Case("train_T1024_yarn", 1024, 16, yarn=True, steps=5, rounds=4, warmup=3),
                    Case("train_T8192_yarn", 8192, 2, yarn=True, steps=3, rounds=4),
                    Case("train_T32768_yarn", 32768, 1, yarn=True, rounds=1, warmup=1),  # does it fit
                    Case("sample_B1", 512, 1, new_tokens=256, rounds=3, warmup=1))),
    "cpu": ("cpu", (Case("train_T512", 512, 8, rounds=15),  # the cpu preset's pretraining step, T = L, batch 8
                    Case("sample_B1", 128, 1, new_tokens=128, rounds=15, warmup=1),
                    Case("sample_follow", 100, 1, new_tokens=1948, rules=True, rounds=7, warmup=1))),  # to 4L
    "smoke": ("tiny", (Case("train_T64", 64, 2, rounds=2, warmup=1),
                       Case("train_T128_yarn", 128, 2, yarn=True, rounds=2, warmup=1),
                       Case("train_T256_yarn", 256, 1, yarn=True, rounds=1, warmup=1, force_chunked=True),
                       Case("sample_B1", 16, 1, new_tokens=8, rounds=2, warmup=1),
                       Case("sample_follow", 8, 1, new_tokens=120, rules=True, rounds=1, warmup=1))),
}


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "auto"  # gpu, cpu or smoke; auto = gpu where CUDA is available, else cpu
    out: str = "bench.json"  # the JSON report, rewritten after every case
    cases: str = ""  # comma-separated case names to run; empty = every case of the preset
    device: str = "auto"  # auto = cuda for the gpu preset (an error without CUDA), cpu for cpu and smoke
    hf: bool = True  # false: our model only
    threads: int = 0  # torch threads on CPU; 0 = torch's default
    rounds: int = 0  # timed rounds per case; 0 = the case's own

    def __post_init__(self):
        flags.check_types(self)
        if self.preset not in ("auto", *PRESETS):
            raise ValueError(f"--preset must be auto, {', '.join(PRESETS)}, got {self.preset!r}")
        if self.threads < 0 or self.rounds < 0:
            raise ValueError(f"--threads and --rounds must be >= 0, got {self.threads} and {self.rounds}")


def resolve(cfg: BenchConfig) -> tuple[str, torch.device, list[Case]]:
    """(preset, device, cases) for a config; a ValueError for an unknown case name or device."""
    preset = cfg.preset if cfg.preset != "auto" else "gpu" if torch.cuda.is_available() else "cpu"
    device = pick_device(cfg.device if cfg.device != "auto" else "cuda" if preset == "gpu" else "cpu")
    known = PRESETS[preset][1]
    wanted = [c for c in cfg.cases.split(",") if c]
    unknown = set(wanted) - {c.name for c in known}
    if unknown:
        raise ValueError(f"--cases: unknown {sorted(unknown)} for preset {preset}; known: "
                         f"{', '.join(c.name for c in known)}")
    return preset, torch.device(device), [c for c in known if not wanted or c.name in wanted]


# Models: ours and Hugging Face's with the same weights
def configs(p: reproduce.Preset, case: Case) -> model.ModelConfig:
    rope_cfg = RopeConfig(type="yarn", factor=case.T / p.L, original_context=p.L) if case.yarn else RopeConfig()
    rope_cfg = RopeConfig(type="dynamic_yarn", original_context=p.L) if case.rules else rope_cfg
    return model.ModelConfig(vocab_size=p.vocab_size, n_layer=p.n_layer, n_head=p.n_head, d_model=p.d_model,
                             block_size=max(p.L, case.T + case.new_tokens), rope=rope_cfg)


def build(which: str, cfg: model.ModelConfig, device, dtype):
    """Ours (seeded), or LlamaForCausalLM with hf.hf_config's LlamaConfig and ours' weights (hf.hf_tensors),
    built in `dtype` (its rotary inv_freq stays fp32, as from_pretrained leaves it)."""
    torch.manual_seed(0)
    with torch.device(device):
        ours = model.Transformer(cfg)
    if which == "ours":
        return ours.to(device=device, dtype=dtype)
    from transformers import LlamaConfig, LlamaForCausalLM

    keys = {k: v for k, v in hf.hf_config(cfg).items() if k not in (hf.RECORD_KEY, "architectures", "model_type")}
    with torch.device(device):
        net = LlamaForCausalLM._from_config(LlamaConfig(**keys, attn_implementation="sdpa"), dtype=dtype)
    weights = ours.state_dict()
    net.load_state_dict(hf.hf_tensors(weights, cfg), strict=False)
    assert net.lm_head.weight is net.model.embed_tokens.weight, "Hugging Face's model did not tie its embeddings"
    net.generation_config.eos_token_id, net.generation_config.pad_token_id = None, 0
    return net.to(device)


def train_step(which: str, net, case: Case, device):
    """One training step of `net` as a function: random tokens, forward with loss, backward, AdamW."""
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, net.config.vocab_size, (case.B, case.T), generator=g).to(device) for _ in range(2))
    if which == "ours" and case.force_chunked:
        net.loss_chunk_threshold = 0
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = net(x, y) if which == "ours" else net(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def generation(which: str, net, case: Case, device, outputs: dict):
    """One greedy generation of case.new_tokens after a random prompt, as a function; its tokens in outputs."""
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, net.config.vocab_size, (case.B, case.T), generator=g).to(device)

    @torch.no_grad()
    def run():
        if which != "hf":  # ours, under the rule of that name if it is one
            rule = which if which in model.ROPE_RULES else "follow"
            outputs[which] = torch.stack(list(net.generate(prompt, case.new_tokens, temperature=0, rule=rule)), dim=1)
        else:
            out = net.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, use_cache=True)
            outputs[which] = out[:, case.T:]

    return run


# Measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_record(exc: BaseException) -> dict:
    return {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:600]}",
            "traceback_tail": traceback.format_exc().strip().splitlines()[-6:]}


def prepare(make, case: Case, device) -> tuple[object, dict]:
    """(fn, record): make() builds a model and returns its round function, run case.warmup times untimed here;
    the record has the peak memory on CUDA. (None, error record) if building or warming up failed."""
    cuda = device.type == "cuda"
    gc.collect()  # the previous case's models
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    t0 = time.perf_counter()
    try:
        fn = make()
        for _ in range(case.warmup):
            fn()
        sync(device)
    except Exception as e:  # an OOM or a missing kernel: recorded, and the other model still runs
        return None, error_record(e)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if cuda else None
    return fn, {"status": "ok", "build_and_warmup_s": round(time.perf_counter() - t0, 2), "peak_mem_gb": peak}


def alternate(fns: dict, rounds: int, repeat: int, device) -> dict[str, list[float]]:
    """Seconds per round for each function, the functions taking turns round by round; a round calls fn repeat
    times. A function that raises is dropped from the later rounds with its error kept under its name."""
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in list(fns.items())[:: 1 if r % 2 == 0 else -1]:  # who goes first alternates too
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


def run_case(p: reproduce.Preset, case: Case, cfg: BenchConfig, device, peak: float | None) -> dict:
    """Two contenders on one case (ours and HF, or ours under two rules): build and warm up each, then timed rounds
    taking turns."""
    mcfg = configs(p, case)
    sampling = case.new_tokens > 0
    dtype = torch.bfloat16 if sampling and device.type == "cuda" else torch.float32
    outputs, fns, results = {}, {}, {}
    pair = ("follow", "capacity") if case.rules else ("ours", "hf")
    for which in pair if cfg.hf or case.rules else pair[:1]:
        def make(which=which):
            net = build("hf" if which == "hf" else "ours", mcfg, device, dtype)
            if sampling:
                return generation(which, net, case, device, outputs)
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
            results[which].update(tokens_per_s=tps, round_s=[round(s, 5) for s in t], tokens_per_round=tokens)
            if not sampling:
                results[which]["mfu"] = flops * tps / peak if peak else None
    if not sampling and results["ours"].get("status") == "ok":
        big = case.B * case.T * p.vocab_size > model.Transformer.loss_chunk_threshold
        results["ours"]["chunked_loss"] = case.force_chunked or big
    record = {"T": case.T, "B": case.B, "new_tokens": case.new_tokens or None, "dtype": dtype_name(dtype),
              "rope": asdict(mcfg.rope), "flops_per_token": None if sampling else flops, "results": results}
    a, b = pair
    ok = all(isinstance(times.get(w), list) and times[w] for w in pair)
    record[f"{a}_over_{b}"] = statistics.median(tb / ta for ta, tb in zip(times[a], times[b])) if ok else None
    if sampling and set(pair) <= outputs.keys():
        record["tokens_match"] = (outputs[a].cpu() == outputs[b].cpu()).float().mean().item()
    return record


# The run
def header(cfg: BenchConfig, preset: str, device, argv) -> dict:
    return {**provenance(str(device), argv), "command": " ".join(["python bench.py", *argv]), "preset": preset,
            "cuda": torch.version.cuda, "hf": cfg.hf, "threads": torch.get_num_threads(),
            "transformers": importlib.metadata.version("transformers") if cfg.hf else None,
            "load_average_start": os.getloadavg(), "model": asdict(reproduce.PRESETS[PRESETS[preset][0]]),
            "matmul_peak": None, "cases": {}}


def table(report: dict) -> str:
    """The report as a markdown table: one row per case."""
    rows = ["| case | ours tokens/s | HF tokens/s | ours / HF | peak GB ours / HF | MFU ours |",
            "|---|---|---|---|---|---|"]
    for name, c in report["cases"].items():
        r = c.get("results", {})
        a, b = ("follow", "capacity") if "follow" in r else ("ours", "hf")  # a rules case: follow in ours' columns
        get = lambda w, k, f: format(r[w][k], f) if r.get(w, {}).get(k) is not None else "-"  # noqa: E731
        ratio = f"{c[f'{a}_over_{b}']:.2f}x" if c.get(f"{a}_over_{b}") else c.get("error", "-")[:60]
        rows.append(f"| {name}{' (follow / capacity)' if a == 'follow' else ''} | {get(a, 'tokens_per_s', ',.0f')} | "
                    f"{get(b, 'tokens_per_s', ',.0f')} | {ratio} | {get(a, 'peak_mem_gb', '.2f')} / "
                    f"{get(b, 'peak_mem_gb', '.2f')} | {get(a, 'mfu', '.1%')} |")
    return "\n".join(rows)


def main(argv) -> dict:
    cfg = flags.build(BenchConfig, flags.parse(argv, flags.flag_table((BenchConfig, "")), "python bench.py",
                                               __doc__))
    preset, device, cases = resolve(cfg)
    cfg = replace(cfg, hf=cfg.hf and importlib.util.find_spec("transformers") is not None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif preset == "smoke":
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and waiting ones crawl on a shared CPU
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    p = reproduce.PRESETS[PRESETS[preset][0]]
    report = header(cfg, preset, device, argv)
    print(f"bench: {report['device']}, torch {report['torch']}, transformers {report['transformers']}, "
          f"{report['threads']} threads, cases {[c.name for c in cases]}", flush=True)
    try:
        report["matmul_peak"] = matmul_peak(device, {"gpu": 8192, "cpu": 1024}.get(preset, 256))
    except Exception as e:
        report["matmul_peak"] = error_record(e)
    write_json(cfg.out, report)
    for case in cases:
        t0 = time.perf_counter()
        try:
            record = {"status": "ok", **run_case(p, case, cfg, device, report["matmul_peak"].get("flops"))}
        except Exception as e:
            record = error_record(e)
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        report["cases"][case.name] = record
        ratio = record.get("ours_over_hf", record.get("follow_over_capacity"))
        print(f"[{case.name}] speed ratio {ratio}, {record['wall_s']} s", flush=True)
        write_json(cfg.out, report)
    report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["load_average_end"] = os.getloadavg()  # 1, 5, 15 minutes: other work on the machine meanwhile
    write_json(cfg.out, report)
    print(table(report) + f"\nwrote {cfg.out}", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(flags.cli(main))
