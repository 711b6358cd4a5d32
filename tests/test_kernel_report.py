"""The kernel report (resnet_fast.kernel_report): kernels compiled for sm_80 / sm_90a on the CPU,
figures read back from the cubins, and checks that can fail.

Triton compiles run in spawned worker processes (this process's triton is in interpreter mode,
see conftest.py). The Triton part takes ~1 min cold on 2 CPU cores (Triton caches the kernels);
the CUDA part (marked slow) compiles csrc/conv_sm80.cu once (~30-60 s cold, then cached under
~/.cache/resnet_fast).
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

from resnet_fast.kernel_report import archs, cubin, cuda_aot, model
from resnet_fast.kernel_report import report as rep
from resnet_fast.kernel_report.cli import format_report, main as cli_main
from resnet_fast.kernel_report.layers import distinct_layers

pytest.importorskip("torchvision")

try:
    cubin.find_tool("cuobjdump")
except cubin.ToolMissing as e:  # pragma: no cover - triton's wheel ships it
    pytest.skip(f"no cuobjdump: {e}", allow_module_level=True)


def _cuobjdump_resources(path: str) -> dict[str, dict[str, int]]:
    """An independent parse of `cuobjdump --dump-resource-usage` (not the module's parser)."""
    out = subprocess.run([cubin.find_tool("cuobjdump"), "--dump-resource-usage", path],
                         capture_output=True, text=True, check=True).stdout
    res, fn = {}, None
    for line in out.splitlines():
        if line.strip().startswith("Function "):
            fn = line.strip()[len("Function "):].rstrip(":")
        elif fn and "REG:" in line:
            res[fn] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
    return res


# --------------------------------------------------------------------------------------------
# One config per distinct ResNet-50 layer, both arches, bf16 and fp16 (the full candidate set is
# the command's job: python -m resnet_fast.kernel_report --check)
# --------------------------------------------------------------------------------------------
_reports: dict = {}


def _subset_report(dtype, archs_, tmp_path_factory) -> dict:
    key = (dtype, archs_)
    if key not in _reports:
        # the training variants once (bf16, both archs): their fp16 kernels are the same code
        opts = rep.ReportOptions(dtype=dtype, archs=archs_, backends=("triton",), jobs=2, progress=False,
                                 one_config_per_layer=True, training=dtype == torch.bfloat16,
                                 other_kernels=dtype == torch.bfloat16,
                                 cubin_dir=tmp_path_factory.mktemp("cubins"))
        _reports[key] = rep.build_report(opts)
    return _reports[key]


@pytest.mark.parametrize("dtype,archs_", [
    (torch.bfloat16, ("sm_80", "sm_90a")),
    (torch.float16, ("sm_90a",)),
])
def test_resnet50_triton_kernels_use_tensor_cores_without_spills(dtype, archs_, tmp_path_factory):
    report = _subset_report(dtype, archs_, tmp_path_factory)
    rows = report["rows"]
    layers, _ = distinct_layers("resnet50", 256, training=dtype == torch.bfloat16)
    for arch in archs_:
        spec = archs.get_arch(arch)
        mine = [r for r in rows if r["arch"] == arch]
        assert {r["label"] for r in mine} == {rep.layer_label(layer) for layer in layers}, "a layer has no row"
        for r in mine:
            where = f"{arch} {r['label']} {r['config']['name']}"
            assert not r.get("error"), where + ": " + r["error"]
            want = "HGMMA" if arch == "sm_90a" else "HMMA"
            assert r["tensor_core"] == want or r.get("path_reason"), \
                f"{where}: main loop runs {r['tensor_core']}, expected {want}, and no reason given"
            assert r["mma_in_main_loop"], f"{where}: the MMA instructions are outside every loop"
            assert r["spill_bytes"] == 0, f"{where}: spills {r['spill_bytes']} bytes"
            assert 0 < r["shared_bytes"] <= spec.smem_per_block_max, f"{where}: {r['shared_bytes']} B smem"
            assert r["ctas_per_sm"] >= 1 and r["estimate_us"] > 0
            assert r["ok"], f"{where}: {r['problems']}"
        # the training kernels beside the conv: compiled, no spills
        tk = [k for k in report["training_kernels"] if k["arch"] == arch]
        assert dtype != torch.bfloat16 or len(tk) == 12, tk
        assert all(k["ok"] and k["spill_bytes"] == 0 for k in tk), tk
    print(format_report(report))


def test_report_figures_match_cuobjdump(tmp_path_factory):
    """Every row's registers, spills and static shared memory are what cuobjdump says about the
    cubin the row names, and the row's fields the JSON contract promises are there."""
    report = _subset_report(torch.bfloat16, ("sm_80", "sm_90a"), tmp_path_factory)
    json.dumps(report, default=str)  # serialisable
    seen = {}
    for r in report["rows"]:
        for k in ("layer", "backend", "arch", "dtype", "config", "registers", "spill_bytes", "shared_bytes",
                  "tensor_core", "ctas", "ctas_per_sm", "waves", "tile_efficiency", "estimate_us", "cubin"):
            assert k in r, f"row lacks {k}"
        for k in ("cin", "cout", "kernel", "stride", "padding", "h", "w", "batch", "epilogue"):
            assert k in r["layer"]
        if r["cubin"] not in seen:
            seen[r["cubin"]] = _cuobjdump_resources(r["cubin"])
        res = seen[r["cubin"]][r["kernel"]]
        assert r["registers"] == res["REG"]
        assert r["spill_bytes"] == res["STACK"] + res["LOCAL"]
        assert r["shared_static"] == res["SHARED"]
        assert r["shared_bytes"] == r["shared_static"] + r["shared_dynamic"]
        m, n, _ = model.conv_gemm(r["layer"])
        bm, bn = r["config"]["BLOCK_M"], r["config"]["BLOCK_N"]
        assert r["ctas"] == -(-m // bm) * -(-n // bn)


# --------------------------------------------------------------------------------------------
# The checks can fail
# --------------------------------------------------------------------------------------------
def test_oversized_config_is_reported_as_spilling_and_not_fitting():
    import triton

    layer = {"cin": 256, "cout": 256, "kernel": [1, 1], "stride": [1, 1], "padding": [0, 0],
             "h": 14, "w": 14, "batch": 256, "epilogue": "relu"}
    # a 256x256 fp32 accumulator over 128 threads is 512 registers per thread; 4 stages of
    # (256 + 256) x 64 bf16 tiles are 256 KB of shared memory
    huge = triton.Config({"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4)
    for arch in ("sm_90a", "sm_80"):
        (row,) = rep.estimate_layer(layer, "triton", arch, torch.bfloat16, configs={"huge": huge})
        assert not row.get("error"), row.get("error")
        spec = archs.get_arch(arch)
        assert row["spill_bytes"] > 0 or row["shared_bytes"] > spec.smem_per_block_max
        assert row["spill_bytes"] > 0, f"{arch}: expected spills, got {row['registers']} registers"
        assert not row["ok"] and any("spills" in p for p in row["problems"])
        if row["shared_bytes"] > spec.smem_per_block_max:
            assert row["ctas_per_sm"] == 0 and row["estimate_us"] is None
            assert any("per-block limit" in p for p in row["problems"])
        assert not row["predicted_pick"]


def test_kernel_without_dot_has_no_tensor_core(tmp_path):
    from resnet_fast.kernel_report import triton_aot

    job = {"kind": "fn", "fn": "resnet_fast.kernels.add_relu:add_relu_kernel", "capability": 90,
           "signature": {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "numel": "i32",
                         "BLOCK": "constexpr", "INT64_OFFSETS": "constexpr"},
           "constexprs": {"BLOCK": 4096, "INT64_OFFSETS": False}, "options": {"num_warps": 8},
           "out_path": str(tmp_path / "add_relu.cubin")}
    (res,) = triton_aot.run_jobs([job])
    assert not isinstance(res, Exception), res
    info = cubin.inspect_cubin(res["cubin"])
    fn = info["add_relu_kernel"]
    assert fn["sass"].tensor_core is None and fn["sass"].mma == {}
    assert fn["spill_bytes"] == 0 and fn["sass"].instructions > 10


def test_sass_parser_finds_the_loop_and_family():
    text = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   LDL R2, [R1] ;
        /*0040*/               @P4 BRA 0x20 ;
        /*0050*/                   EXIT ;
        /*0060*/                   BRA 0x60;
    """
    (s,) = cubin.parse_sass(text).values()
    assert s.loops == [(0x20, 0x40)]
    assert s.mma_in_loop == {"HGMMA.64x128x16.F32.BF16": 1}
    assert s.tensor_core == "HGMMA" and s.local_ops == 1
    (s2,) = cubin.parse_sass(text.replace("HGMMA.64x128x16.F32.BF16", "FFMA")).values()
    assert s2.tensor_core == "HMMA" and s2.mma_in_loop == {}  # an MMA outside every loop still counts


def test_ptxas_performance_notes_are_attributed_to_their_kernel():
    log = ("ptxas info    : (C7510) Potential Performance Loss: wgmma.mma_async instructions are "
           "serialized due to a function call in the function '_ZN7cutlass13device_kernelIXEEvT_'\n"
           "ptxas info    : Used 168 registers\n")
    assert cuda_aot.parse_ptxas_notes(log) == {"_ZN7cutlass13device_kernelIXEEvT_": [
        "C7510 Potential Performance Loss: wgmma.mma_async instructions are serialized due to a function call"]}


def test_occupancy_model():
    h100 = archs.get_arch("sm_90a")
    # 8 warps at 128 registers: 128 * 32 * 8 = 32K registers -> 2 CTAs; 100 KB smem -> 2 CTAs
    assert model.ctas_per_sm(h100, registers=128, shared_bytes=100 * 1024, threads=256) == (2, "shared")
    assert model.ctas_per_sm(h100, registers=255, shared_bytes=0, threads=256)[0] == 1
    assert model.ctas_per_sm(h100, registers=32, shared_bytes=0, threads=128)[0] == 16  # 2048 threads
    assert model.ctas_per_sm(h100, registers=100, shared_bytes=228 * 1024, threads=128)[0] == 0
    a100 = archs.get_arch("sm_80")
    assert model.ctas_per_sm(a100, registers=64, shared_bytes=96 * 1024, threads=128) == (1, "shared")
    assert model.wave_efficiency(1.1) == pytest.approx(0.55)
    assert model.tile_efficiency(100, 64, 128, 64) == pytest.approx(100 / 128)


# --------------------------------------------------------------------------------------------
# Missing CUDA rows are explained; estimate_layer_us for benchmarks/
# --------------------------------------------------------------------------------------------
def test_report_runs_without_cuda_and_says_why(monkeypatch, tmp_path, capsys):
    def broken(archs, *a, **k):
        return {arch: cuda_aot.CudaUnavailable("nvcc failed on conv_sm90.cu (test)") for arch in archs}
    monkeypatch.setattr(cuda_aot, "compile_archs", broken)
    code = cli_main(["--arch", "sm_90a", "--triton-configs", "m128n128k64w8s4", "--quiet", "--no-training",
                     "--model", "resnet18", "--batch", "8", "--layers", r"layer2\.1\.conv1$",
                     "--cubin-dir", str(tmp_path / "c"),
                     "--json", str(tmp_path / "r.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "cuda rows missing for sm_90a: nvcc failed on conv_sm90.cu (test)" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["rows"]) == 1 and data["rows"][0]["backend"] == "triton"
    assert data["training_kernels"] == []  # --no-training
    assert data["rows"][0]["layer"]["names"] == ["layer2.1.conv1"]
    assert data["env"]["notes"]["cuda_missing"]["sm_90a"].startswith("nvcc failed")


def test_estimate_layer_us_takes_benchmark_rows():
    # benchmarks/layers.py's row format: in_hw, epilogue strings, no batch (passed separately)
    row = {"cin": 512, "cout": 2048, "kernel": [1, 1], "stride": [1, 1], "padding": [0, 0],
           "dilation": [1, 1], "groups": 1, "in_hw": [7, 7], "out_hw": [7, 7], "epilogue": "residual+relu"}
    est = rep.estimate_layer_us(row, backend="triton", arch="sm_90a", batch=256)
    assert est is not None and 1 < est < 1000
    assert rep.estimate_layer_us(row, backend="torch", arch="sm_90a", batch=256) is None
    assert rep.estimate_layer_us(row, backend="triton", batch=256, device="cpu") is None


# --------------------------------------------------------------------------------------------
# CUDA (CUTLASS) kernels: compiled with nvcc, cached
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cuda_sm80_kernels_are_read_from_the_cubin():
    try:
        built = cuda_aot.compile_arch("sm_80")
    except cuda_aot.CudaUnavailable as e:
        pytest.skip(f"CUDA sources cannot be compiled here: {e}")
    kernels = built["kernels"]
    assert kernels, "no kernels in the sm_80 cubin"
    res = _cuobjdump_resources(built["units"][0]["cubin"])
    for k in kernels:
        where = f"{k['config']} {k['dtype']}"
        assert k["dtype"] in ("bf16", "fp16") and k["tile"] and all(t > 0 for t in k["tile"]), where
        assert k["threads"] and k["threads"] % 32 == 0, where
        assert k["shared_dynamic"] and k["shared_dynamic"] <= archs.get_arch("sm_80").smem_per_block_max, where
        assert k["sass"].tensor_core == "HMMA" and k["spill_bytes"] == 0, where
        assert k["registers"] == res[k["function"]]["REG"]
        assert not k["config"].endswith("?"), f"{where}: not matched to a config name"


def test_inference_kernels_other_than_the_conv_compile(tmp_path_factory):
    """The stem's input conversion, the stem max-pool and the TMA 1x1 GEMM: compiled for both
    archs without spills, the GEMM on TMA loads with HGMMA on sm_90a, each with an estimate."""
    report = _subset_report(torch.bfloat16, ("sm_80", "sm_90a"), tmp_path_factory)
    rows = report["inference_kernels"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90a"}
    for r in rows:
        assert r.get("ok"), r
        if "fallback" in r:
            continue
        assert r["spill_bytes"] == 0 and r["estimate_us"] > 0, r
        if r["kernel"] == "gemm_bn_act_kernel" and r["arch"] == "sm_90a":
            assert r["tma_loads"] > 0 and any(k.startswith("HGMMA") for k in r["mma"]), r
    labels = {r["label"] for r in rows}
    assert any("max-pool" in x for x in labels) and any("stem input" in x for x in labels)


def test_fp8_conv_compiles_to_e4m3_tensor_cores(tmp_path_factory):
    """The fp8 conv (resnet_fast.fp8_ops) on sm_90a: QGMMA with E4M3 operands, no spills, an
    estimate at the 8-bit rate; sm_80 (no fp8 tensor cores): one row saying it falls back."""
    report = _subset_report(torch.bfloat16, ("sm_80", "sm_90a"), tmp_path_factory)
    fp8 = [r for r in report["inference_kernels"] if r.get("dtype") == "fp8e4m3"]
    hopper = [r for r in fp8 if r["arch"] == "sm_90a"]
    assert len(hopper) >= 4
    for r in hopper:
        assert r["ok"] and r["spill_bytes"] == 0 and r["estimate_us"] > 0, r
        assert any(k.startswith("QGMMA") and "E4M3.E4M3" in k for k in r["mma"]), r
    ampere = [r for r in fp8 if r["arch"] == "sm_80"]
    assert len(ampere) == 1 and "no fp8 tensor cores" in ampere[0]["fallback"]
