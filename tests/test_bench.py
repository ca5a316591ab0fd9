"""Smoke tests of the benchmark suite (bench/): its code paths at a minuscule size.

The torch parts are skipped cleanly when torch is not installed.  Speed itself
is never asserted here (bench/ measures it); these tests check that the suite
runs, that its numbers are consistent (FLOPs from cnet.summary, ratios, memory),
and that the torch twins compute exactly what the cnet models compute.
"""
import json
import os
import sys

import numpy as np
import pytest

import cnet
from cnet import models

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import common  # noqa: E402
import gemm_ceiling  # noqa: E402
import profile_layers  # noqa: E402
import throughput  # noqa: E402
from _torch_models import spec_from_cnet  # noqa: E402

HAVE_TORCH = common.torch_available()
TINY = ["--models", "lenet5", "--threads", "1", "--batch", "4", "--repeats", "2",
        "--rounds", "2", "--min-repeats", "1", "--no-ceiling", "--gap", "0", "--warm", "0"]


def _to_nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("build, shape", [
    (lambda: models.lenet5(), (32, 32, 1)),
    (lambda: models.resnet20(), (16, 16, 3)),            # option-A shortcuts
    (lambda: models.resnext_cifar(11, 2, 4), (8, 8, 3)),  # grouped conv, projection shortcuts
])
def test_torch_twin_computes_the_same(build, shape):
    torch = pytest.importorskip("torch")
    from _torch_models import build_torch, copy_weights
    m = build()
    spec = json.loads(json.dumps(spec_from_cnet(m)))        # must survive JSON (process hop)
    t = build_torch(spec)
    copy_weights(m, t)
    assert sum(p.numel() for p in t.parameters()) == sum(p.size for p in m.parameters())
    m.eval()
    t.eval()
    x = np.random.default_rng(0).standard_normal((3,) + shape).astype(np.float32)
    ref = m(x)
    with torch.no_grad():
        out = t(torch.from_numpy(_to_nchw(x))).numpy()
        t_cl = t.to(memory_format=torch.channels_last)
        out_cl = t_cl(torch.from_numpy(_to_nchw(x)).contiguous(
            memory_format=torch.channels_last)).numpy()
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=1e-4)
    np.testing.assert_allclose(out_cl, ref, atol=1e-5 * scale, rtol=1e-4)


def test_spec_rejects_unknown_layers():
    class Odd(cnet.nn.Module):
        def forward(self, x):
            return x
    with pytest.raises(ValueError, match="no torch twin for Odd"):
        spec_from_cnet(cnet.nn.Sequential(Odd()))


def test_resnext_8x16d_is_what_the_suite_says():
    m, shape, batch, _ = common.build_cnet_model("resnext29_8x16d")
    convs = [c for c in m.modules() if isinstance(c, cnet.nn.Conv2d) and c.groups > 1]
    assert (shape, batch) == ((32, 32, 3), 64)
    assert {c.groups for c in convs} == {8}
    assert sorted({c.in_channels for c in convs}) == [128, 256, 512]   # 8 groups x 16, x2, x4


def test_throughput_suite_runs(tmp_path):
    out = tmp_path / "t.json"
    # one torch layout keeps the test short (every framework is a process to start)
    args = TINY + ["--modes", "train" if HAVE_TORCH else "train,infer", "--json", str(out),
                   "--torch-layouts", "cl"]
    if not HAVE_TORCH:
        args.append("--no-torch")
    results = throughput.main(args)
    data = json.loads(out.read_text())
    assert len(data["results"]) == len(results) >= 1
    flops = cnet.summary(models.lenet5(), (32, 32, 1), verbose=False)["flops"]
    for r in results:
        assert r["batch"] == 4 and r["flops_per_sample"] == flops
        c = r["frameworks"]["cnet"]
        assert len(c["times"]) == r["repeats"] == 2 and all(t > 0 for t in c["times"])
        assert c["median_s"] > 0 and c["peak_mb"] >= 0
        mult = 3 if r["mode"] == "train" else 1
        assert c["gflops"] == pytest.approx(flops * 4 * mult / c["median_s"] / 1e9)
        if HAVE_TORCH:
            assert set(r["frameworks"]) == {"cnet", "torch_cl"}
            t = r["frameworks"]["torch_cl"]
            assert r["torch_best"] == "torch_cl" and t["peak_mb"] >= 0
            assert r["speed_ratio"] == pytest.approx(t["median_s"] / c["median_s"])
    text = throughput.report(results, {}, HAVE_TORCH)
    assert "lenet5" in text and ("speed vs torch" in text) == HAVE_TORCH


@pytest.mark.parametrize("name", list(common.MODELS))
def test_remove_batchnorm_keeps_the_rest(name):
    model = common.build_cnet_model(name)[0]
    kinds = [type(m).__name__ for m in model.modules()]
    removed = common.remove_batchnorm(model)
    after = [type(m).__name__ for m in model.modules()]
    assert removed == kinds.count("BatchNorm2d") and "BatchNorm2d" not in after
    assert sorted(after) == sorted(k for k in kinds if k != "BatchNorm2d")
    full = common.build_cnet_model(name)[0]
    assert len(list(model.parameters())) == len(list(full.parameters())) - 2 * removed


def test_remove_batchnorm_fuses_the_relu_and_refuses_a_model_that_ran():
    nn = cnet.nn
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    assert common.remove_batchnorm(seq) == 1 and len(seq) == 2
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)
    conv = seq[0]
    ref = np.maximum(conv(x), 0)
    np.testing.assert_array_equal(seq(x), ref)
    assert conv._relu      # the ReLU runs in the convolution now
    ran = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ran(x)
    with pytest.raises(ValueError, match="has run"):
        common.remove_batchnorm(ran)


def test_ablation_is_timed_with_the_others():
    args = TINY + ["--modes", "train", "--ablate", "batchnorm", "--torch-layouts", "cl"]
    if not HAVE_TORCH:
        args.append("--no-torch")
    (r,) = throughput.main(args)
    nb = r["frameworks"]["cnet_no_bn"]
    assert len(nb["times"]) == 2 and nb["median_s"] > 0
    text = throughput.report([r], {}, HAVE_TORCH)
    assert "cnet no-BN ms" in text
    if HAVE_TORCH:
        assert r["torch_best"] == "torch_cl"
        assert r["no_bn_ratio"] == pytest.approx(r["frameworks"]["torch_cl"]["median_s"]
                                                 / nb["median_s"])
        assert r["speed_ratio"] == pytest.approx(r["frameworks"]["torch_cl"]["median_s"]
                                                 / r["frameworks"]["cnet"]["median_s"])


def test_infer_without_torch_runs():
    results = throughput.main(TINY + ["--modes", "infer", "--no-torch", "--repeats", "1",
                                      "--rounds", "1"])
    assert list(results[0]["frameworks"]) == ["cnet"] and results[0]["mode"] == "infer"


def test_scaling_mode_interleaves_thread_counts(tmp_path):
    out = tmp_path / "s.json"
    args = ["--scaling", "--models", "lenet5", "--threads", "1,2", "--batch", "4",
            "--modes", "train", "--repeats", "2", "--rounds", "2", "--min-repeats", "1",
            "--gap", "0", "--warm", "0", "--json", str(out)]
    results = throughput.main(args)
    (r,) = results
    assert set(r["times"]) == {"1", "2"} and all(len(v) == 2 for v in r["times"].values())
    assert json.loads(out.read_text())["scaling"][0]["median_s"] == r["median_s"]
    text = throughput.scaling_table(results, [1, 2])
    want = r["median_s"]["1"] / r["median_s"]["2"]
    assert f"{want:.2f}x" in text and "1 -> 2 thr" in text


def test_profile_layers_accounts_the_step():
    before = cnet.get_num_threads()
    res = profile_layers.profile_cnet("lenet5", 1, iters=2, batch=4)
    assert cnet.get_num_threads() == before
    keys = {(r["name"], r["phase"]) for r in res["rows"]}
    assert {("conv1", "fwd"), ("conv1", "bwd"), ("fc3", "bwd"), ("loss", "fwd"),
            ("optimizer step", "opt")} <= keys
    conv1 = next(r for r in res["rows"] if r["name"] == "conv1" and r["phase"] == "fwd")
    assert conv1["gflops"] > 0 and conv1["out_shape"] == [28, 28, 6]
    # no wrapper is left behind on the model's modules
    assert all(r["ms"] >= 0 for r in res["rows"])
    assert sum(res["categories"].values()) == pytest.approx(
        sum(r["ms"] for r in res["rows"]) + max(0.0, res["unaccounted_ms"]))
    assert "conv1" in profile_layers.report(res, 5)


def test_profile_torch_categories():
    pytest.importorskip("torch")
    m, shape, batch, classes = common.build_cnet_model("lenet5", 4)
    cfg = {"spec": spec_from_cnet(m), "input": list(shape), "batch": batch, "classes": classes,
           "threads": 1, "mode": "train", "iters": 2, "layout": "channels_last", "warmup": 1}
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        res = profile_layers.profile_torch(cfg)
    finally:
        torch.set_num_threads(before)
    cats = res["categories"]
    assert cats.get("conv fwd", 0) > 0 and cats.get("conv bwd", 0) > 0
    assert cats.get("optimizer + zero_grad", 0) > 0
    assert sum(cats.values()) >= res["step_ms"] * 0.999


def test_gemm_probe_and_helpers():
    assert gemm_ceiling.sgemm_gflops(64, 32, 16, 1, repeats=2, min_seconds=1e-3) > 0
    assert gemm_ceiling.sgemm_gflops(32, 16, 8, 1, repeats=1, groups=3, min_seconds=1e-3) > 0
    assert gemm_ceiling.sgemm_gflops_workers(64, 32, 16, 2, repeats=1, min_seconds=1e-3) > 0
    own = gemm_ceiling.own_gemm_gflops(96, 64, 80, 1, repeats=1, min_seconds=1e-3)
    from cnet_ext import _conv
    assert (own > 0) if _conv.gemm_kernel() else own is None
    assert common.spread([1.0, 1.0, 1.0, 1.0]) == 0.0
    assert common.reset_peak_rss() > 0 and common.peak_rss_kb() > 0
    t = common.table(["a", "b"], [["x", 1], ["yy", 22]])
    assert t.splitlines()[0].startswith("| a ") and "22 |" in t
    env = common.torch_env()
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        assert env.get(var) == common._USER_OMP_WAIT.get(var)


def test_torch_malloc_variant_gets_cnets_thresholds():
    from cnet import _malloc
    assert common.malloc_env() == {"MALLOC_MMAP_THRESHOLD_": str(_malloc.KEEP_BYTES),
                                   "MALLOC_TRIM_THRESHOLD_": str(_malloc.KEEP_BYTES)}


def test_conv_layers_can_switch_image_blocks_off(monkeypatch, capsys):
    import conv_layers
    conv = conv_layers.conv_mod
    monkeypatch.setattr(conv, "_IMAGE_BLOCK_MAX_WIDTH", conv._IMAGE_BLOCK_MAX_WIDTH)  # restored
    conv_layers.main(["--only", "stage3", "--repeats", "1", "--threads", "1",
                      "--no-image-blocks"])
    out = capsys.readouterr().out
    assert "image blocks up to width 0" in out and "8x8x64->64 3x3" in out
    assert conv._IMAGE_BLOCK_MAX_WIDTH == 0


def test_gemm_kernel_bench_times_every_product(monkeypatch, capsys):
    import gemm_kernel
    monkeypatch.setattr(gemm_kernel, "LAYERS", {"tiny": (128, 32, 64)})
    gemm_kernel.main(["--threads", "1", "--rounds", "1", "--reps", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("tiny")]
    assert [r[1] for r in rows] == ["forward", "dx", "dx+=", "dW"]
    assert [r[2] for r in rows] == ["128x32x64", "128x64x32", "128x64x32", "32x128x64"]
    assert all(float(r[-1]) > 0 for r in rows)


def test_ceiling_is_the_faster_source_and_reads_old_probes():
    """The ceiling per thread count is the best sample of any source, the report
    names the source it came from; older JSON files held plain numbers (BLAS)."""
    sources = throughput.ceiling_sources({"2": [{"blas": 230.0, "cnet": 410.0},
                                                {"blas": 236.0, "cnet": 402.0}],
                                          1: [120.0, 118.0]})
    assert sources == {2: {"blas": 236.0, "cnet": 410.0}, 1: {"blas": 120.0}}
    ceilings = {t: max(v.values()) for t, v in sources.items()}
    line = throughput.report([], ceilings, False, sources).splitlines()[-1]
    assert "2 thr 410.0 (cnet's own GEMM; numpy's BLAS 236.0)" in line
    assert "1 thr 120.0" in line and "1 thr 120.0 (" not in line
