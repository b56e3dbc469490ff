"""
Throughput benchmark: this repository's Transformer (model.py) side by side with Hugging Face's LlamaForCausalLM
of the same shape, in one run, on one GPU.

    python bench.py --out bench.json                      # every case; about 6-9 minutes on an H100 (cold caches)
    python bench.py --cases train_T1024,sample_B1         # a subset
    python bench.py --smoke --out /tmp/smoke.json         # tiny shapes on CPU, every code path, seconds

The shape (the full run): 12 layers, d_model 768, 12 heads of 64, SwiGLU with hidden 2048 (model.py's rule,
8/3 d_model rounded up to 64; the same intermediate_size for Hugging Face), vocab 50304, tied embeddings,
124M parameters. Both models get the same regime:
    training  fp32 master weights, bf16 autocast, fused AdamW (on CUDA), torch.compile(dynamic=False),
              random tokens; Hugging Face computes its own loss from labels (its standard path), use_cache=False.
    sampling  bf16 weights, greedy, KV cache: ours by model.generate (eager) and by a compiled single-token
              step over the preallocated cache (static shapes, mode="reduce-overhead": CUDA graphs);
              Hugging Face's generate with its default DynamicCache (eager) and with a StaticCache (which
              transformers compiles by itself on CUDA).
YaRN: s = 8 over L = 1024 (the extension 1024 -> 8192) for T <= 8192, s = 32 over L = 1024 for T = 32768. A static
variant's frequencies and 1/t differ from plain RoPE at every T; the cost does not depend on s or L.

Cases (--cases, in this order): train_T1024 (B=16; plain and YaRN, ours and HF; plus the recompile counts of
set_rope), attention_kernels (causal SDPA fwd+bwd per backend at the T=8192 shape), sample_B1, train_T8192_yarn
(B=2), sample_B64, train_T32768_yarn (B=1; ours takes model.py's chunked head + loss there), and
train_T1024_chunked_loss (ours with the chunked loss forced on: where its threshold belongs). PERF_NOTES.md has the
expected numbers and the GPU plan.

Each case: warmup steps (the first compiles), then timed steps, each between CUDA events; the median is
reported. MFU = model.flops_per_token(T) * tokens/s over (a) the bf16 matmul peak measured in the same run and
(b) the H100's 989 TFLOP/s spec. Peak memory: torch.cuda.max_memory_allocated, reset before each model.
Every case runs in try/except: an error (an OOM) is recorded in the JSON and the next case runs. The JSON is
rewritten after every case, so a run cut short keeps what it measured. transformers is optional: without it,
only our model runs and the JSON says so.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import hf
import model
import rope
from rope import RopeConfig

H100_BF16_SPEC = 989e12  # dense bf16 tensor-core FLOP/s, H100 SXM datasheet
# run order: the goals first; the last is a what-if for the loss-chunking threshold (ours only)
CASES = ("train_T1024", "attention_kernels", "sample_B1", "train_T8192_yarn", "sample_B64", "train_T32768_yarn",
         "train_T1024_chunked_loss")

# ----------------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shapes:
    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    L: int  # the original context the YaRN configs extend
    train_short: tuple[int, int]  # (T, B) of train_T1024
    train_long: tuple[int, int]  # (T, B) of train_T8192_yarn
    train_huge: tuple[int, int]  # (T, B) of train_T32768_yarn
    sample_batches: tuple[int, int]  # (B of sample_B1, B of sample_B64)
    prompt: int
    new_tokens: int
    warmup: int
    steps: int
    sample_reps: int
    matmul_n: int


FULL = Shapes(n_layer=12, d_model=768, n_head=12, vocab_size=50304, L=1024, train_short=(1024, 16),
              train_long=(8192, 2), train_huge=(32768, 1), sample_batches=(1, 64), prompt=512, new_tokens=256,
              warmup=3, steps=20, sample_reps=3, matmul_n=8192)
SMOKE = Shapes(n_layer=2, d_model=64, n_head=2, vocab_size=512, L=32, train_short=(64, 2), train_long=(128, 1),
               train_huge=(256, 1), sample_batches=(1, 4), prompt=16, new_tokens=8,
               warmup=1, steps=2, sample_reps=1, matmul_n=256)


def model_config(s: Shapes, rope_cfg: RopeConfig, block_size: int) -> model.ModelConfig:
    return model.ModelConfig(vocab_size=s.vocab_size, n_layer=s.n_layer, n_head=s.n_head, d_model=s.d_model,
                             block_size=block_size, rope=rope_cfg)


def yarn(s: Shapes, factor: float) -> RopeConfig:
    return RopeConfig(type="yarn", factor=factor, original_context=s.L)


PLAIN = RopeConfig()

# ----------------------------------------------------------------------------------------------------------
# Helpers: devices, timing, memory, compile counters


def log(*args):
    print(*args, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, warmup: int, reps: int, device) -> list[float]:
    """Seconds per call of fn, each timed between CUDA events (or perf_counter on CPU), after warmup calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    sync(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def reset_memory(device):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def dynamo_graph_breaks() -> int:
    """Graph breaks dynamo has taken so far in this process (each splits a compiled region)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def compile_module(module, args, **kwargs):
    if args.compile == "none":
        return module
    return torch.compile(module, backend=args.compile, dynamic=False, **kwargs)


def error_record(exc: BaseException) -> dict:
    tb = traceback.format_exc().strip().splitlines()
    return {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:800]}", "traceback_tail": tb[-8:]}


def measure_matmul_peak(device, n: int) -> dict:
    """FLOP/s of an n x n x n matmul (bf16 on CUDA, fp32 on CPU), median of timed repetitions."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_calls(lambda: a @ b, warmup=3, reps=20 if device.type == "cuda" else 3, device=device)
    flops = 2 * n**3 / statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": flops / 1e12, "flops": flops}


def throughput(tokens: int, times: list[float], flops_per_token: float, peak: float | None, device) -> dict:
    step = statistics.median(times)
    tps = tokens / step
    out = {
        "tokens_per_s": tps,
        "step_ms_median": step * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "timed_steps": len(times),
        "flops_per_token": flops_per_token,
        "mfu_measured_peak": flops_per_token * tps / peak if peak else None,
        "mfu_h100_spec": flops_per_token * tps / H100_BF16_SPEC if device.type == "cuda" else None,
    }
    out["peak_mem_gb"] = peak_memory_gb(device)
    return out


def ratio(a: dict, b: dict, key: str = "tokens_per_s"):
    if a.get("status") == "ok" and b.get("status") == "ok":
        return a[key] / b[key]
    return None


# ----------------------------------------------------------------------------------------------------------
# Profiling: which SDPA backend ran, and where the time goes


ATTENTION_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def kernel_category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "gemv", "xmma", "cutlass", "nvjet", "cublas", "matmul", "addmm", "aten::mm")):
        return "matmul"
    if "adam" in n or "foreach" in n:
        return "optimizer"
    if "triton" in n:
        return "fused (triton)"
    return "other"


def profile_step(fn, device, top: int = 12) -> dict:
    """One call of fn under torch.profiler: the SDPA backends (from the aten ops called), the top kernels by
    self device time (self CPU time on CPU), and that time split by kind."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    backends = sorted({ATTENTION_OPS[e.key] for e in events if e.key in ATTENTION_OPS})

    def self_time(e):
        if device.type == "cuda":
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
        return e.self_cpu_time_total

    if device.type == "cuda":  # kernels only: device events not named like a CPU range (user annotations are)
        cuda = torch.autograd.DeviceType.CUDA
        cpu_names = {e.key for e in events if getattr(e, "device_type", None) != cuda}
        kernels = [e for e in events
                   if getattr(e, "device_type", None) == cuda and e.key not in cpu_names and self_time(e) > 0]
    else:
        kernels = [e for e in events if self_time(e) > 0]
    total = sum(self_time(e) for e in kernels) or 1
    by_kind = {}
    for e in kernels:
        kind = kernel_category(e.key)
        by_kind[kind] = by_kind.get(kind, 0) + self_time(e) / total
    kernels.sort(key=self_time, reverse=True)
    return {
        "sdpa_backends": backends,
        "device_time_ms": total / 1e3,
        "time_by_kind": {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": e.key[:120], "ms": self_time(e) / 1e3, "share": round(self_time(e) / total, 4),
                         "calls": e.count} for e in kernels[:top]],
    }


# ----------------------------------------------------------------------------------------------------------
# The two models


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_ours(cfg: model.ModelConfig, device, dtype=None) -> model.Transformer:
    torch.manual_seed(0)
    net = model.Transformer(cfg).to(device)
    return net.to(dtype) if dtype is not None else net


def build_hf(cfg: model.ModelConfig, device, dtype=torch.float32):
    """LlamaForCausalLM with our shape and RoPE: same hidden size, heads, SwiGLU intermediate size (cfg.hidden_dim),
    vocab, tied embeddings, RMSNorm eps, no biases; rope_parameters from rope.to_hf (same frequencies and 1/t)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rp = cfg.rope
    max_positions = max(cfg.block_size, int(rp.original_context * rp.factor) if rp.type == "yarn" else 0)
    hc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=max_positions, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, rope_parameters=hf.to_hf(rp, cfg.head_dim),
        bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=True, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    # _from_config(dtype=...) builds in that dtype but keeps the rotary inv_freq buffer in fp32; .to(bf16) would cast it
    net = LlamaForCausalLM._from_config(hc, dtype=dtype).to(device)
    assert net.lm_head.weight is net.model.embed_tokens.weight, "Hugging Face model did not tie its embeddings"
    return net


def make_optimizer(net, device):
    fused = device.type == "cuda"
    return torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)


# ----------------------------------------------------------------------------------------------------------
# Training cases


def train_impl(kind: str, net, T: int, B: int, args, device, peak, flops_per_token, after_timing=None) -> dict:
    """Time full training steps (forward with loss, backward, fused AdamW step) of `net` at (B, T)."""
    compiled = compile_module(net, args)
    opt = make_optimizer(net, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(0, net.config.vocab_size, (B, T), generator=g).to(device)
    y = torch.randint(0, net.config.vocab_size, (B, T), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    if kind == "ours":
        def loss_fn():
            return compiled(x, y)
    else:  # Hugging Face shifts labels by itself: loss over T-1 positions, the head still over all T.
        def loss_fn():  # use_cache=False: training needs no KV cache (LlamaConfig's default would build one)
            return compiled(input_ids=x, labels=x, use_cache=False).loss

    def step():
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time_training(step, B * T, args, device, peak, flops_per_token, after_timing)


def _time_training(step, tokens, args, device, peak, flops_per_token, after_timing=None) -> dict:
    graphs, breaks = dynamo_graphs(), dynamo_graph_breaks()
    times = time_calls(step, args.warmup, args.steps, device)
    out = {"status": "ok", **throughput(tokens, times, flops_per_token, peak, device),
           "dynamo_graphs_compiled": dynamo_graphs() - graphs, "dynamo_graph_breaks": dynamo_graph_breaks() - breaks}
    if args.profile:
        try:
            out["profile"] = profile_step(step, device)
        except Exception as e:  # a profiler failure must not lose the timing
            out["profile"] = error_record(e)
    if after_timing is not None:
        out.update(after_timing(step))
    return out


def run_impl(name: str, fn, results: dict, device):
    """results[name] = fn(), or the error; memory released either way."""
    reset_memory(device)
    torch._dynamo.reset()
    log(f"  {name} ...")
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:
        results[name] = error_record(e)
        log(f"  {name} FAILED: {results[name]['error']}")
    results[name]["wall_s"] = time.perf_counter() - t0
    if results[name].get("status") == "ok":
        r = results[name]
        mem = f", peak {r['peak_mem_gb']:.2f} GB" if r.get("peak_mem_gb") else ""
        log(f"  {name}: {r['tokens_per_s']:,.0f} tokens/s{mem}")
    torch._dynamo.reset()  # compiled code holds the model: drop it before the next one is built
    reset_memory(device)


def case_train_short(s: Shapes, args, device, peak, hf: bool) -> dict:
    """T=1024, batch 16: plain RoPE and YaRN (s=8, L=1024), ours and Hugging Face. Ours switches the variant on the
    same compiled model with set_rope, which also measures what the switch recompiles."""
    T, B = s.train_short
    results = {}
    cfg = model_config(s, PLAIN, T)
    flops = model.Transformer(model_config(s, PLAIN, 8)).flops_per_token(T)  # shape only; block 8: a small RoPE table
    yarn_cfg = yarn(s, 8.0)

    def ours_both():
        net = build_ours(cfg, device)

        def switch_to_yarn(step):
            try:
                return _switch_to_yarn(step)
            except Exception as e:  # keep the plain-RoPE numbers already measured
                return {"_yarn": error_record(e), "_recompiles": None}

        def _switch_to_yarn(step):
            # "YaRN costs nothing": same compiled module, new tables; count what set_rope + a step recompiles
            before = dynamo_graphs()
            net.set_rope(yarn_cfg)
            yarn_res = _time_training(step, B * T, args, device, peak, flops)
            variant_recompiles = dynamo_graphs() - before
            before = dynamo_graphs()
            net.set_rope(yarn_cfg.replace(factor=16.0))
            step()
            net.set_rope(yarn_cfg.replace(original_context=2 * s.L))
            step()
            scale_recompiles = dynamo_graphs() - before
            return {"_yarn": yarn_res, "_recompiles": {"variant_default_to_yarn": variant_recompiles,
                                                         "scale_and_L_changes_within_yarn": scale_recompiles}}

        return train_impl("ours", net, T, B, args, device, peak, flops, after_timing=switch_to_yarn)

    run_impl("ours_default", ours_both, results, device)
    ours = results["ours_default"]
    results["ours_yarn"] = ours.pop("_yarn", None) or {"status": "error", "error": "not reached (ours_default failed)"}
    recompiles = ours.pop("_recompiles", None)
    if hf:
        run_impl("hf_default", lambda: train_impl("hf", build_hf(cfg, device), T, B, args, device, peak, flops),
                 results, device)
        hf_yarn = model_config(s, yarn_cfg, T)
        run_impl("hf_yarn", lambda: train_impl("hf", build_hf(hf_yarn, device), T, B, args, device, peak, flops),
                 results, device)
    yarn_over_plain = ratio(results["ours_yarn"], ours)
    try:
        guard_check = rope_recompile_check(cfg, yarn_cfg, device)
    except Exception as e:
        guard_check = error_record(e)
    checks = {
        "ours_yarn_over_default_tokens_per_s": yarn_over_plain,
        "yarn_within_1pct": None if yarn_over_plain is None else abs(yarn_over_plain - 1) <= 0.01,
        "recompiles_training": recompiles if args.compile != "none" else "compile=none: nothing traced",
        "recompiles_dynamo": guard_check,
        "how": "torch._dynamo.utils.counters['stats']['unique_graphs'] deltas after set_rope + a step; "
               "_training: on the compiled training step; _dynamo: a forward under torch.compile(backend='eager') "
               "(dynamo's guards, which decide recompiles, are the same for every backend)",
    }
    ratios = {"ours_default_over_hf_default": ratio(ours, results.get("hf_default", {})),
              "ours_yarn_over_hf_yarn": ratio(results["ours_yarn"], results.get("hf_yarn", {})),
              "hf_yarn_over_hf_default": ratio(results.get("hf_yarn", {}), results.get("hf_default", {}))}
    return {"T": T, "B": B, "rope": {"plain": asdict(PLAIN), "yarn": asdict(yarn_cfg)},
            "results": results, "ratios": ratios, "yarn_checks": checks}


def rope_recompile_check(cfg: model.ModelConfig, yarn_cfg: RopeConfig, device) -> dict:
    """Graphs dynamo compiles for a forward after each set_rope: first plain RoPE, then YaRN, a new scale, a new L,
    and plain RoPE again. 0 = the compiled code was reused."""
    net = build_ours(replace_block(cfg, 64), device)
    f = torch.compile(net, backend="eager", dynamic=False)
    x = torch.zeros(1, 64, dtype=torch.long, device=device)
    steps = [("plain (first compile)", PLAIN), ("plain -> yarn", yarn_cfg),
             ("yarn: scale s changed", yarn_cfg.replace(factor=2 * yarn_cfg.factor)),
             ("yarn: L changed", yarn_cfg.replace(original_context=2 * yarn_cfg.original_context)),
             ("yarn -> plain", PLAIN)]
    out = {}
    with torch.no_grad():
        for label, rp in steps:
            net.set_rope(rp)
            before = dynamo_graphs()
            f(x)
            out[label] = dynamo_graphs() - before
    torch._dynamo.reset()
    return out


def replace_block(cfg: model.ModelConfig, block_size: int) -> model.ModelConfig:
    return model.ModelConfig.from_dict({**cfg.to_dict(), "block_size": block_size})


def case_train_yarn(s: Shapes, args, device, peak, hf: bool, T: int, B: int, factor: float) -> dict:
    """One long-context training case with YaRN (s = factor over L): ours and Hugging Face."""
    rp = yarn(s, factor)
    cfg = model_config(s, rp, T)
    flops = model.Transformer(model_config(s, PLAIN, 8)).flops_per_token(T)
    results = {}

    def ours():
        net = build_ours(cfg, device)
        if args.smoke:  # make the tiny shape take the chunked-loss path the full shape takes at T=32768
            net.loss_chunk_threshold, net.loss_chunk_elements = 2**16, 2**14
        res = train_impl("ours", net, T, B, args, device, peak, flops)
        res["chunked_loss"] = B * T * cfg.vocab_size > net.loss_chunk_threshold
        return res

    run_impl("ours", ours, results, device)
    if hf:
        run_impl("hf", lambda: train_impl("hf", build_hf(cfg, device), T, B, args, device, peak, flops),
                 results, device)
    return {"T": T, "B": B, "rope": asdict(rp), "results": results,
            "ratios": {"ours_over_hf": ratio(results["ours"], results.get("hf", {}))}}


def case_attention_kernels(s: Shapes, args, device) -> dict:
    """Causal SDPA forward + backward at the T=8192 shape (B, 12 heads, T, 64) under each backend alone, and under
    the default choice: what attention costs there and which kernel a model change should ask for."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    T, B = s.train_long
    H, hd = s.n_head, s.d_model // s.n_head
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(3)
    q, k, v, grad = (torch.randn(B, H, T, hd, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    flops = 6 * H * hd * T * B * T  # model.flops_per_token's attention term for one layer, times B*T tokens

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    if device.type == "cpu" or T <= 4096:
        backends["math"] = SDPBackend.MATH
    results = {}
    for name, backend in backends.items():
        try:
            if backend is None:
                times = time_calls(fwd_bwd, 2, 5, device)
            else:
                with sdpa_kernel([backend]):
                    times = time_calls(fwd_bwd, 2, 5, device)
            t = statistics.median(times)
            results[name] = {"status": "ok", "tokens_per_s": B * T / t, "fwd_bwd_ms": t * 1e3,
                             "tflops": flops / t / 1e12}
        except Exception as e:  # a backend that does not support this shape, dtype or GPU
            results[name] = error_record(e)
    ok = {n: r for n, r in results.items() if r["status"] == "ok"}
    fastest = max(ok, key=lambda n: ok[n]["tokens_per_s"]) if ok else None
    ratios = {"fastest_over_default": ratio(ok[fastest], results["default"]) if fastest else None}
    return {"T": T, "B": B, "heads": H, "head_dim": hd, "dtype": str(dtype).removeprefix("torch."),
            "fastest": fastest, "results": results, "ratios": ratios}


def case_train_chunked_loss(s: Shapes, args, device, peak) -> dict:
    """What-if: ours at T=1024, batch 16 with the chunked head + loss forced on (model.py uses it only above
    loss_chunk_threshold logits). Compared with train_T1024's ours_default, it says where the threshold belongs."""
    T, B = s.train_short
    cfg = model_config(s, PLAIN, T)
    flops = model.Transformer(model_config(s, PLAIN, 8)).flops_per_token(T)
    results = {}

    def ours():
        net = build_ours(cfg, device)
        net.loss_chunk_threshold = 0
        return train_impl("ours", net, T, B, args, device, peak, flops)

    run_impl("ours_chunked_loss", ours, results, device)
    return {"T": T, "B": B, "rope": asdict(PLAIN), "results": results,
            "ratios": {"chunked_over_unchunked": None}}  # filled in by cross_case_ratios when train_T1024 ran


def cross_case_ratios(report: dict):
    """Ratios between cases of the same run: the forced chunked loss over train_T1024's ours_default."""
    cases = report["cases"]
    chunked, short = cases.get("train_T1024_chunked_loss", {}), cases.get("train_T1024", {})
    if chunked.get("status") == "ok" and short.get("status") == "ok":
        chunked["ratios"]["chunked_over_unchunked"] = ratio(chunked["results"]["ours_chunked_loss"],
                                                            short["results"]["ours_default"])


# ----------------------------------------------------------------------------------------------------------
# Sampling cases


class StaticDecoder(nn.Module):
    """One greedy decoding step of a Transformer over its preallocated KVCache with every shape fixed, so it can be
    compiled once and replayed as a CUDA graph: the new token attends to all max_len cache slots under a mask
    (slots past `pos` are masked out, so they contribute exactly zero), its cos/sin row is indexed by a position
    tensor, and the cache is written in place with index_copy_. The same computation as model.Attention with a
    cache (checked: its tokens equal model.generate's, the `tokens_match_generate` field)."""

    def __init__(self, net: model.Transformer, cache: model.KVCache):
        super().__init__()
        self.net = net
        self.n_layer, self.max_len = len(net.blocks), cache.max_len
        for i in range(self.n_layer):  # the cache's own tensors: the prefill writes them, this step too
            self.register_buffer(f"k{i}", cache.k[i], persistent=False)
            self.register_buffer(f"v{i}", cache.v[i], persistent=False)
        cos, sin = net.rotary(0, cache.max_len, cache.rope_length)  # the table model.generate uses
        self.register_buffer("cos", cos.clone(), persistent=False)
        self.register_buffer("sin", sin.clone(), persistent=False)
        self.register_buffer("slots", torch.arange(cache.max_len, device=cos.device), persistent=False)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """token (B, 1) ids at position pos (1,) -> the next token (B,), greedy."""
        net = self.net
        cos, sin = self.cos[pos], self.sin[pos]  # (1, |D|/2)
        mask = (self.slots <= pos)[None, None, None, :]  # (1, 1, 1, max_len), True = attend
        x = net.tok_emb(token)  # (B, 1, d)
        for i, block in enumerate(net.blocks):
            a = block.attn
            h = block.attn_norm(x)
            q = rearrange(a.wq(h), "b t (h d) -> b h t d", h=a.n_head)  # (B, H, 1, hd)
            k = rearrange(a.wk(h), "b t (h d) -> b h t d", h=a.n_kv_head)
            v = rearrange(a.wv(h), "b t (h d) -> b h t d", h=a.n_kv_head)
            q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
            k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")  # (B, H_kv, max_len, hd)
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                               enable_gqa=a.n_kv_head != a.n_head)  # (B, H, 1, hd)
            x = x + a.wo(rearrange(y, "b h t d -> b t (h d)"))
            x = x + block.mlp(block.mlp_norm(x))
        return net.lm_head(net.norm(x))[:, -1].argmax(dim=-1)


def static_generate(net: model.Transformer, prompt: torch.Tensor, new_tokens: int, args, device):
    """A greedy generator with the same tokens as model.generate: prefill by net's forward with the cache (eager),
    then compiled single-token steps. Returns run() -> (B, new_tokens) tokens."""
    B, P = prompt.shape
    cache = net.new_cache(B, P + new_tokens)
    decoder = StaticDecoder(net, cache)
    if device.type == "cuda":
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t)  # mutated in place: keep them at fixed addresses for CUDA graphs
    cuda_graphs = args.compile == "inductor" and device.type == "cuda"
    step = compile_module(decoder, args, **({"mode": "reduce-overhead"} if cuda_graphs else {}))
    positions = torch.arange(P, P + new_tokens, device=device)

    def run():
        cache.pos = 0
        token = net(prompt, cache=cache, last_n=1)[:, -1].argmax(dim=-1)  # as model.generate's prefill
        out = [token]
        for i in range(new_tokens - 1):
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            token = step(token[:, None], positions[i : i + 1]).clone()  # clone: a graph's output is reused
            out.append(token)
        return torch.stack(out, dim=1)

    return run, cuda_graphs


def sample_impl(gen, B: int, new_tokens: int, args, device) -> dict:
    """Time whole greedy generations (prefill + new_tokens tokens); tokens/s counts new tokens."""
    times = time_calls(gen, 1, args.sample_reps, device)
    t = statistics.median(times)
    return {"status": "ok", "tokens_per_s": B * new_tokens / t, "generate_s_median": t,
            "ms_per_token_step": t / new_tokens * 1e3, "timed_generations": len(times),
            "peak_mem_gb": peak_memory_gb(device)}


def case_sample(s: Shapes, args, device, hf: bool, B: int) -> dict:
    P, N = s.prompt, s.new_tokens
    rp = yarn(s, 8.0)
    cfg = model_config(s, rp, max(P + N, s.L))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(2)
    prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=g).to(device)
    results = {}
    reference = {}

    def ours_generate():
        net = build_ours(cfg, device, dtype)

        def gen():
            reference["tokens"] = torch.stack(list(net.generate(prompt, N, temperature=0)), dim=1)
        res = sample_impl(gen, B, N, args, device)
        res["how"] = "model.generate, eager"
        return res

    def ours_static():
        net = build_ours(cfg, device, dtype)
        run, cuda_graphs = static_generate(net, prompt, N, args, device)
        tokens = {}

        def gen():
            tokens["out"] = run()
        breaks = dynamo_graph_breaks()
        res = sample_impl(gen, B, N, args, device)
        res["dynamo_graph_breaks"] = dynamo_graph_breaks() - breaks
        res["how"] = ("StaticDecoder, torch.compile mode=reduce-overhead (CUDA graphs)" if cuda_graphs
                      else f"StaticDecoder, compile={args.compile}") + "; prefill eager"
        if "tokens" in reference:
            res["tokens_match_generate"] = (tokens["out"] == reference["tokens"]).float().mean().item()
        return res

    def hf_generate(static: bool):
        net = build_hf(cfg, device, dtype)
        net.generation_config.eos_token_id = None
        net.generation_config.pad_token_id = 0
        if args.compile == "none":
            net.generation_config.disable_compile = True
        kwargs = {"cache_implementation": "static"} if static else {}
        mask = torch.ones_like(prompt)

        def gen():
            net.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=N, min_new_tokens=N,
                         do_sample=False, use_cache=True, **kwargs)
        res = sample_impl(gen, B, N, args, device)
        auto = device.type == "cuda" and args.compile != "none"
        res["how"] = ("generate, StaticCache" + (" (transformers compiles the decoding forward itself)" if auto
                                                 else " (not compiled)")) if static else "generate, DynamicCache, eager"
        return res

    with torch.no_grad():
        run_impl("ours_generate", ours_generate, results, device)
        run_impl("ours_static", ours_static, results, device)
        if hf:
            run_impl("hf_generate", lambda: hf_generate(False), results, device)
            run_impl("hf_static", lambda: hf_generate(True), results, device)

    def best(names):
        ok = [results[n] for n in names if results.get(n, {}).get("status") == "ok"]
        return max(ok, key=lambda r: r["tokens_per_s"]) if ok else {}

    ours_best, hf_best = best(("ours_generate", "ours_static")), best(("hf_generate", "hf_static"))
    ratios = {
        "ours_best_over_hf_generate": ratio(ours_best, results.get("hf_generate", {})) if ours_best else None,
        "ours_best_over_hf_best": ratio(ours_best, hf_best) if ours_best and hf_best else None,
        "ours_generate_over_hf_generate": ratio(results["ours_generate"], results.get("hf_generate", {})),
        "ours_static_over_hf_static": ratio(results["ours_static"], results.get("hf_static", {})),
    }
    return {"B": B, "prompt": P, "new_tokens": N, "dtype": str(dtype).removeprefix("torch."),
            "rope": asdict(rp), "results": results, "ratios": ratios}


# ----------------------------------------------------------------------------------------------------------
# Report


def print_table(report: dict):
    log("\n" + "=" * 118)
    log(f"{report['device']}  torch {report['torch']}  transformers {report['transformers']}  "
        f"matmul peak {report['matmul_peak'].get('tflops', float('nan')):.1f} TFLOP/s (measured)")
    log(f"{'case':20s} {'impl':15s} {'tokens/s':>13s} {'ms/step':>9s} {'MFU meas':>9s} {'MFU spec':>9s} "
        f"{'peak GB':>8s}  note")
    for name, case in report["cases"].items():
        if case.get("status") != "ok":
            log(f"{name:20s} {'-':15s} ERROR {case.get('error', '')[:80]}")
            continue
        for impl, r in case["results"].items():
            if r.get("status") != "ok":
                log(f"{name:20s} {impl:15s} ERROR {r.get('error', '')[:80]}")
                continue
            ms = next((r[k] for k in ("step_ms_median", "ms_per_token_step", "fwd_bwd_ms") if k in r), float("nan"))
            pct = lambda v: f"{100 * v:8.1f}%" if v is not None else f"{'-':>9s}"  # noqa: E731
            mem = f"{r['peak_mem_gb']:8.2f}" if r.get("peak_mem_gb") is not None else f"{'-':>8s}"
            note = ",".join(r.get("profile", {}).get("sdpa_backends", [])) if isinstance(r.get("profile"), dict) else ""
            log(f"{name:20s} {impl:15s} {r['tokens_per_s']:13,.0f} {ms:9.2f} {pct(r.get('mfu_measured_peak'))} "
                f"{pct(r.get('mfu_h100_spec'))} {mem}  {note}")
        for key, value in case.get("ratios", {}).items():
            log(f"{'':20s} {key}: {f'{value:.3f}x' if isinstance(value, float) else '-'}")
        if "yarn_checks" in case:
            c = case["yarn_checks"]
            log(f"{'':20s} YaRN/plain (ours) {c['ours_yarn_over_default_tokens_per_s']}, within 1%: "
                f"{c['yarn_within_1pct']}")
            log(f"{'':20s} recompiles (training): {c['recompiles_training']}")
            log(f"{'':20s} recompiles (dynamo check): {c['recompiles_dynamo']}")
    log("=" * 118)


def write_json(report: dict, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, every code path, a few seconds")
    p.add_argument("--out", default="bench.json", help="JSON report path (rewritten after every case)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {','.join(CASES)}")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--compile", default=None, choices=("inductor", "eager", "none"),
                   help="torch.compile backend for both models (default inductor; none with --smoke)")
    p.add_argument("--no-hf", action="store_true", help="run our model only")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the one profiled training step")
    p.add_argument("--warmup", type=int, default=None, help="training warmup steps (the first compiles)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (median reported)")
    p.add_argument("--sample-reps", type=int, default=None, help="timed generations per sampling impl")
    args = p.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c and c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    args.case_list = [c for c in CASES if c in args.cases.split(",")]
    shapes = SMOKE if args.smoke else FULL
    args.warmup = shapes.warmup if args.warmup is None else args.warmup
    args.steps = shapes.steps if args.steps is None else args.steps
    args.sample_reps = shapes.sample_reps if args.sample_reps is None else args.sample_reps
    args.compile = args.compile or ("none" if args.smoke else "inductor")
    args.device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    return args, shapes


def main(argv=None) -> int:
    args, s = parse_args(argv)
    device = torch.device(args.device)
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and busy-waiting ones crawl on a shared CPU
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls outside autocast, as train.py
    hf = hf_available() and not args.no_hf
    if hf:
        import transformers
    out_path = Path(args.out)
    report = {
        "command": " ".join(["python", *([sys.argv[0]] if argv is None else ["bench.py"]),
                             *(sys.argv[1:] if argv is None else argv)]),
        "smoke": args.smoke,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__ if hf else None,
        "hf_note": None if hf else ("--no-hf: our model only" if args.no_hf
                                    else "transformers is not installed: our model only"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "shapes": asdict(s),
        "settings": {"compile": args.compile, "warmup": args.warmup, "steps": args.steps,
                     "sample_reps": args.sample_reps, "profile": args.profile},
        "regime": {
            "training": "fp32 master weights, torch.autocast bf16 (CUDA; bf16 autocast on CPU too), "
                        "AdamW fused=True on CUDA, torch.compile(dynamic=False), random tokens; "
                        "HF loss from labels=input_ids with use_cache=False",
            "sampling": "weights in bf16 (fp32 on CPU), greedy; ours: model.generate (eager) and StaticDecoder "
                        "(compiled, CUDA graphs); HF: generate with DynamicCache (eager) and with StaticCache",
            "mfu": "model.flops_per_token(T) (6N + 6 n_layer d_model T: causal attention) x tokens/s over the "
                   "measured bf16 matmul peak and over 989 TFLOP/s (H100 SXM bf16 dense spec)",
        },
        "matmul_peak": {},
        "cases": {},
    }
    log(f"bench: {report['device']}, torch {torch.__version__}, transformers {report['transformers']}, "
        f"cases {args.case_list}, compile={args.compile}")
    try:
        report["matmul_peak"] = measure_matmul_peak(device, s.matmul_n)
        mp = report["matmul_peak"]
        log(f"matmul peak: {mp['tflops']:.1f} TFLOP/s ({mp['dtype']}, n={s.matmul_n})")
    except Exception as e:
        report["matmul_peak"] = error_record(e)
    peak = report["matmul_peak"].get("flops")
    write_json(report, out_path)

    runners = {
        "train_T1024": lambda: case_train_short(s, args, device, peak, hf),
        "train_T8192_yarn": lambda: case_train_yarn(s, args, device, peak, hf, *s.train_long, factor=8.0),
        "train_T32768_yarn": lambda: case_train_yarn(s, args, device, peak, hf, *s.train_huge, factor=32.0),
        "sample_B1": lambda: case_sample(s, args, device, hf, s.sample_batches[0]),
        "sample_B64": lambda: case_sample(s, args, device, hf, s.sample_batches[1]),
        "train_T1024_chunked_loss": lambda: case_train_chunked_loss(s, args, device, peak),
        "attention_kernels": lambda: case_attention_kernels(s, args, device),
    }
    for name in args.case_list:
        log(f"\n[{name}]")
        t0 = time.perf_counter()
        try:
            report["cases"][name] = {"status": "ok", **runners[name]()}
        except Exception as e:
            report["cases"][name] = error_record(e)
            log(f"[{name}] FAILED: {report['cases'][name]['error']}")
        report["cases"][name]["wall_s"] = time.perf_counter() - t0
        cross_case_ratios(report)
        reset_memory(device)
        write_json(report, out_path)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write_json(report, out_path)
    try:
        print_table(report)
    except Exception:  # the JSON is what matters; a formatting slip must not turn the run into a failure
        traceback.print_exc()
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
