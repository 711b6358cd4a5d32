"""Smoke test of the benchmark report's CPU path: a tiny config through every section, then
the JSON's keys and the PNG. The GPU figures come from real runs, not from here."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # plain `pytest` from elsewhere: benchmarks/ is not installed
    sys.path.insert(0, ROOT)


@pytest.fixture
def one_thread():
    # two shared cores: one thread keeps the tiny run from fighting itself
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_report_cpu_path(tmp_path, one_thread):
    pytest.importorskip("torchvision")
    from benchmarks import report

    out = tmp_path / "results"
    rep = report.main(["--device", "cpu", "--model", "resnet18", "--batch", "1", "--resolution", "64",
                       "--backends", "torch", "--quick", "--out", str(out)])
    jpath = out / "cpu_resnet18_b1_fp32_r64.json"
    assert rep["files"]["json"] == str(jpath)
    assert (out / "cpu_resnet18_b1_fp32_r64.png").exists()
    d = json.loads(jpath.read_text())

    assert d["complete"] is True and d["gpu_figures"] is False
    assert "NO GPU FIGURES" in d["note"]
    for k in ("torch", "torchvision", "triton", "python", "commit", "dirty", "command", "timestamp_utc"):
        assert k in d["env"], k
    assert d["config"]["model"] == "resnet18" and d["config"]["batch"] == 1
    assert d["peaks"]["matmul_tflops"] > 0 and d["peaks"]["copy_gbps"] > 0
    assert len(d["fusion_summary"]) == 20 and all(r["fused"] for r in d["fusion_summary"])
    assert d["backends"]["torch"]["available"] is True

    lay = d["layers"]
    assert lay["peers"] == ["eager_nchw", "eager_cl", "rf_torch"]
    assert sum(r["multiplicity"] for r in lay["rows"]) == 20
    for r in lay["rows"]:
        for p in lay["peers"]:
            res = r["results"][p]
            assert res["median_ms"] > 0 and res["status"] == "ok", (r["name"], p, res)
    assert set(lay["weighted_total_ms"]) == set(lay["peers"])

    blk = d["blocks"]
    assert [r["block"] for r in blk["rows"]] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert all(r["results"]["rf_torch"]["status"] == "ok" for r in blk["rows"])

    e2e = {r["variant"]: r for r in d["e2e"]["rows"]}
    assert set(e2e) == {"eager_nchw", "eager_cl", "eager_folded", "rf_torch"}
    for r in e2e.values():
        assert r["images_s"] > 0 and r["status"] == "ok" and r["setup_s"] >= 0, r
        assert r["rel_err"] < 1e-5   # fp32 on CPU against the fp64 reference
    assert e2e["eager_cl"]["speedup_vs_eager_cl"] == pytest.approx(1.0)
    assert "compile" in d["skipped"] and "rf_torch_graph" in d["skipped"]

    train = {r["variant"]: r for r in d["train"]["rows"]}
    assert set(train) == {"train_eager", "train_rf_torch"}
    for r in train.values():
        assert r["median_ms"] > 0 and r["images_s"] > 0, r
    assert train["train_rf_torch"]["first_loss_rel_diff"] < 1e-4  # the same first step, fp32
    assert "train_rf_torch_graph" in d["skipped"] and "train_compile" in d["skipped"]
    assert d["fusion_summary"][1]["training"] == "conv+stats → next conv's prologue"
    assert d["failures"] == []


def test_report_time_budget(tmp_path, one_thread):
    """--budget-s 0: no figure starts, each one left out is named, and the JSON is still whole."""
    pytest.importorskip("torchvision")
    from benchmarks import report

    rep = report.main(["--device", "cpu", "--model", "resnet18", "--batch", "1", "--resolution", "32",
                       "--backends", "torch", "--quick", "--budget-s", "0", "--no-plot",
                       "--out", str(tmp_path)])
    assert rep["complete"] is True and rep["config"]["budget_s"] == 0
    assert rep["layers"]["rows"] == [] and rep["blocks"]["rows"] == [] and rep["e2e"]["rows"] == []
    why = rep["skipped"]
    assert "time budget" in why["eager_cl"] and "time budget" in why["block stem"]
    assert any(k.startswith("layer ") and "time budget" in v for k, v in why.items())


def test_default_out_is_git_ignored():
    """`make bench` (no --out) must not overwrite the committed results in benchmarks/results/."""
    import shutil
    import subprocess

    from benchmarks import report

    out = report.parse_args([]).out
    assert out == report.DEFAULT_OUT
    results = os.path.join(ROOT, "benchmarks", "results")
    assert os.path.realpath(out) != os.path.realpath(results)
    assert not os.path.realpath(out).startswith(os.path.realpath(results) + os.sep)
    assert report.parse_args(["--out", results]).out == results  # taken only when named
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    probe = os.path.join(os.path.relpath(out, ROOT), "some_gpu_resnet50_b256_bf16.json")
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", probe], cwd=ROOT)
    assert ignored.returncode == 0, f"{probe} is not ignored by git"


def test_metrics_flag_nan():
    from benchmarks import metrics

    ref = torch.ones(4)
    assert metrics.verdict(metrics.rel_err(torch.tensor([1.0, float("nan"), 1, 1]), ref),
                           torch.bfloat16) == "NaN"
    assert metrics.verdict(metrics.rel_err(ref * 1.5, ref), torch.bfloat16) == "FAIL"
    assert metrics.verdict(metrics.rel_err(ref, ref), torch.bfloat16) == "ok"
    assert json.loads(json.dumps(metrics.json_safe({"e": float("nan")})))["e"] == "nan"


def test_distinct_convs_resnet50():
    from benchmarks import layers, models

    m = models.build("resnet50", device=torch.device("cpu"), resolution=32, seed=0, calib_batch=2)
    convs = layers.distinct_convs(m, 224)
    assert sum(L.multiplicity for L in convs) == 53 and len(convs) == 24
    assert models.count_flops(m, 224)["per_image"] == pytest.approx(8.18e9, rel=1e-2)
    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert not any(torch.allclose(b.running_var, torch.ones_like(b.running_var)) for b in bns)


def test_layer_section_reads_any_converted_model(one_thread):
    """A model that is not a torchvision ResNet (here a pre-activation one) gets its per-layer
    rows from its fused graph: prologue convs, a residual without ReLU, the bare stem; each
    measured against the reference, the rf peers also without their prologue."""
    from benchmarks import layer_peers, layers
    from benchmarks.config import Config
    from tests import any_resnets as ar
    from tests.reference import randomize_bn

    m = randomize_bn(ar.PreActResNet(num_blocks=(1, 1, 1, 1), width=8)).eval()
    convs = layers.distinct_convs(m, 16)
    by_name = {L.name: L for L in convs}
    assert sum(L.multiplicity for L in convs) == 1 + 4 * 2 + 3  # stem, two per block, 3 shortcuts
    stem, pre1, last = by_name["conv1"], by_name["layer1.0.conv1"], by_name["layer1.0.conv2"]
    assert stem.bn is None and stem.epilogue == "none" and not stem.pre
    assert pre1.pre and pre1.bn is not None and pre1.epilogue == "relu" and "pre" in pre1.label()
    assert last.epilogue == "residual" and last.residual and not last.relu
    assert by_name["layer2.0.shortcut.0"].pre and by_name["layer2.0.shortcut.0"].epilogue == "none"

    cfg = Config(model="preact", batch=2, dtype=torch.float32, resolution=16,
                 device=torch.device("cpu"), layout="channels_last", backends=["torch"],
                 sections=["layers"], only=None, skip=set(), ref_dtype=torch.float64, seed=0,
                 quick=True)
    cfg.layer_target_ms, cfg.warmup = 1.0, 1
    peers = ["eager_nchw", "eager_cl", "rf_torch"]
    rows = []
    for i, L in enumerate((stem, pre1, last)):
        row = layer_peers.measure_layer(cfg, L, i, peers, {"matmul_tflops": 1.0, "copy_gbps": 1.0})
        for p in peers:
            res = row["results"][p]
            assert res["status"] == "ok" and res["rel_err"] < 1e-5, (L.name, p, res)
        assert ("without_pre_us" in row["results"]["rf_torch"]) == L.pre
        rows.append(row)

    # the README table gets a "without prologue" column, empty for convs without one (it
    # leaves the reference backend out, so the rows stand in for a kernel backend's here)
    from benchmarks import markdown
    for r in rows:
        r["results"]["rf_triton"] = r["results"].pop("rf_torch")
    table = markdown.layers({"layers": {"peers": ["eager_cl", "rf_triton"], "rows": rows,
                                        "weighted_total_ms": {}}})
    head, _, r_stem, r_pre, _ = table.splitlines()[:5]
    assert "rf_triton without prologue µs" in head
    assert len(head.split("|")) == len(r_stem.split("|")) == len(r_pre.split("|"))
    assert r_stem.split("|")[-4].strip() == "–" and r_pre.split("|")[-4].strip() != "–"
