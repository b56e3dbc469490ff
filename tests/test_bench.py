"""bench.py --smoke (every case, tiny shapes, CPU) and model.py's chunked head + loss, which the T=32768 case needs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench
import model

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------
# The chunked loss: same mean loss and gradients as the unchunked path


def tiny_model(vocab: int = 301) -> model.Transformer:
    torch.manual_seed(0)
    return model.Transformer(model.ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, block_size=64))


def loss_and_grads(net, x, y, chunked: bool, autocast: bool = False):
    net.zero_grad(set_to_none=True)
    net.loss_chunk_threshold = 0 if chunked else 2**62
    net.loss_chunk_elements = 7 * net.config.vocab_size  # 7 rows a chunk: 111 rows make 16 chunks, the last of 6
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
    """Under autocast the chunked path keeps the dtypes (fp32 loss, fp32 grads of fp32 weights) and is as close
    to the fp32 gradients as the unchunked bf16 path is."""
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
        assert torch.isnan(net(x, torch.full_like(y, -1)))  # as F.cross_entropy's mean over no targets


def test_chunking_threshold_default():
    """Unchunked at the benchmark's T=1024 x 16 and T=8192 x 2 (824M logits); chunked at T=32768 (1.65G)."""
    vocab = 50304
    assert 16 * 1024 * vocab <= model.Transformer.loss_chunk_threshold < 32768 * vocab


# ----------------------------------------------------------------------------------------------------------
# bench.py --smoke


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "bench.py", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, elapsed


def test_smoke_runs_quickly(smoke_report):
    _, _, elapsed = smoke_report
    assert elapsed < 120, f"bench.py --smoke took {elapsed:.0f}s (about 20s alone on 2 cores)"


def test_smoke_report_header(smoke_report):
    report, stdout, _ = smoke_report
    for key in ("device", "torch", "transformers", "command", "matmul_peak", "shapes", "regime", "finished"):
        assert key in report, key
    assert report["smoke"] is True and "--smoke" in report["command"]
    assert report["matmul_peak"]["tflops"] > 0
    assert "tokens/s" in stdout and "wrote" in stdout  # the table was printed


def test_smoke_report_has_every_case(smoke_report):
    report, _, _ = smoke_report
    hf = report["transformers"] is not None
    assert set(report["cases"]) == set(bench.CASES)
    for name, case in report["cases"].items():
        assert case["status"] == "ok", (name, case)
        assert case["results"], name
        for impl, r in case["results"].items():
            if (not hf and impl.startswith("hf")) or (name == "attention_kernels" and impl != "default"):
                continue  # an SDPA backend may not exist on this device; it is recorded as an error
            assert r["status"] == "ok", (name, impl, r)
            assert r["tokens_per_s"] > 0, (name, impl)
        assert isinstance(case["ratios"], dict) and case["ratios"], name
        for key, value in case["ratios"].items():
            if hf or "hf" not in key:
                assert value is not None and value > 0, (name, key, value)


def test_smoke_training_fields(smoke_report):
    report, _, _ = smoke_report
    short = report["cases"]["train_T1024"]
    assert {"ours_default", "ours_yarn"} <= set(short["results"])
    if report["transformers"] is not None:
        assert {"hf_default", "hf_yarn"} <= set(short["results"])
    for r in short["results"].values():
        assert r["flops_per_token"] > 0 and 0 < r["mfu_measured_peak"]
        assert r["profile"]["sdpa_backends"], r["profile"]  # which attention kernel ran
    checks = short["yarn_checks"]
    assert checks["ours_yarn_over_default_tokens_per_s"] > 0
    # a new scale or L reuses the compiled code; a new variant name recompiles once (a guard on cfg.type)
    assert checks["recompiles_dynamo"]["yarn: scale s changed"] == 0
    assert checks["recompiles_dynamo"]["yarn: L changed"] == 0
    assert checks["recompiles_dynamo"]["yarn -> plain"] == 0
    assert report["cases"]["train_T32768_yarn"]["results"]["ours"]["chunked_loss"] is True
    assert report["cases"]["train_T8192_yarn"]["results"]["ours"]["chunked_loss"] is False


def test_smoke_attention_kernels(smoke_report):
    report, _, _ = smoke_report
    case = report["cases"]["attention_kernels"]
    assert case["fastest"] in case["results"] and case["results"]["default"]["fwd_bwd_ms"] > 0
    assert {"flash", "efficient", "cudnn"} <= set(case["results"])  # each tried, ok or with its error


def test_smoke_static_decoder_matches_generate(smoke_report):
    report, _, _ = smoke_report
    for name in ("sample_B1", "sample_B64"):
        assert report["cases"][name]["results"]["ours_static"]["tokens_match_generate"] == 1.0


def test_cases_subset_and_errors_are_recorded(tmp_path, monkeypatch):
    """--cases picks a subset; a case that raises is recorded in the JSON and the run goes on."""
    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench, "case_train_yarn", boom)
    out = tmp_path / "b.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--smoke", "--no-hf", "--no-profile", "--cases", "train_T8192_yarn,sample_B1",
                           "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # --smoke sets 1 for its process
    report = json.loads(out.read_text())
    assert list(report["cases"]) == ["sample_B1", "train_T8192_yarn"]  # bench.CASES order
    assert report["cases"]["train_T8192_yarn"]["status"] == "error"
    assert "OutOfMemoryError" in report["cases"]["train_T8192_yarn"]["error"]
    assert report["cases"]["sample_B1"]["results"]["ours_static"]["tokens_per_s"] > 0
    assert report["transformers"] is None and "our model only" in report["hf_note"]


def test_unknown_case_is_an_error():
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "train_T1024,nope"])
