"""The package ships whole: the wheel holds every subpackage on disk, installs into a fresh
environment (no checkout on sys.path, no editable install) and runs there; the sdist holds what
its tests import.

The wheel is built from a copy of the files git would carry (tracked, plus untracked ones it does
not ignore), so a stale build/ folder of the checkout cannot hide a missing file. The fresh
venv has no pip and no packages of its own: the wheel goes in with this interpreter's pip
(``--python``), then a .pth file makes this environment's site-packages (torch, torchvision,
triton...) visible to it. A folder named in a .pth file is only appended to sys.path; the .pth
files inside it (this checkout's editable install) are not run, which the test verifies.
About 1 min on 2 cores with a warm Triton cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG_DATA = ("*.cu", "*.cpp", "*.h", "*.cuh")

pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 600), **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _copy_tree(dst: Path) -> Path:
    """The files git would carry, copied to dst (no build/, egg-info or caches); outside a git
    checkout (an unpacked sdist) the tree less what .gitignore names."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "out", "*.egg-info", "__pycache__",
                                      ".pytest_cache", ".benchmarks", "*.so", "*.cubin", ".whl", ".carry")
        shutil.copytree(ROOT, dst, ignore=skip, dirs_exist_ok=True)
        return dst
    files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the work tree is not carried
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "TRITON_INTERPRET", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", **extra)
    return env


def expected_wheel_files() -> set[str]:
    """What the wheel must hold, from the folders on disk."""
    want = {"resnet_fast/py.typed"}
    for init in (ROOT / "resnet_fast").rglob("__init__.py"):
        want.add(init.relative_to(ROOT).as_posix())
    for folder, pkg in (("kernels", "resnet_fast/kernels"), ("csrc", "resnet_fast/csrc")):
        for f in (ROOT / folder).rglob("*"):
            if f.is_file() and (f.suffix == ".py" or any(f.match(p) for p in PKG_DATA)) \
                    and "__pycache__" not in f.parts:
                want.add(f"{pkg}/{f.relative_to(ROOT / folder).as_posix()}")
    for f in (ROOT / "resnet_fast").rglob("*.py"):
        if "__pycache__" not in f.parts:
            want.add(f.relative_to(ROOT).as_posix())
    return want


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _copy_tree(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(out), str(src)], env=_clean_env())
    (whl,) = out.glob("resnet_fast-*.whl")
    return whl


def test_wheel_holds_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(expected_wheel_files() - names)
    assert not missing, f"left out of the wheel: {missing}"
    assert not any(n.startswith(("kernels/", "csrc/", "tests/", "benchmarks/")) for n in names), \
        "the wheel claims a generic top-level name"
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Provides-Extra: cuda" in text and "nvidia-cutlass>=4.2; extra == \"cuda\"" in text


INSTALLED_CHECK = textwrap.dedent("""
    import copy, sys, torch, torchvision
    import resnet_fast
    venv = sys.argv[1]
    assert resnet_fast.__file__.startswith(venv), resnet_fast.__file__
    assert not resnet_fast.__file__.startswith(sys.argv[2] + "/"), resnet_fast.__file__
    assert not any(p.rstrip("/") == sys.argv[2] for p in sys.path), sys.path
    import resnet_fast.csrc, resnet_fast.kernels, resnet_fast.kernel_report
    from resnet_fast.backends import cuda_backend
    assert (cuda_backend.CSRC / "bindings.cpp").exists() and str(cuda_backend.CSRC).startswith(venv)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5); m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5); m.bias.normal_(0, 0.5)
    ref = copy.deepcopy(model)
    resnet_fast.convert(model)
    rows = resnet_fast.fusion_summary(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, want = model(x), ref(x)
    err = ((out.double() - want.double()).norm() / want.double().norm()).item()
    assert err < 1e-5, err
    print("ok", resnet_fast.__file__, err, len(rows))
""")


def test_wheel_installs_and_runs_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
          "--no-compile", str(wheel)], env=_clean_env())
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    assert (site / "resnet_fast" / "__init__.py").exists()
    # only after the install: pip would otherwise see (and replace) this checkout's editable one
    outer = sysconfig.get_paths()["purelib"]
    (site / "outer_site_packages.pth").write_text(outer + "\n")

    work = tmp_path / "cwd"  # outside the repository
    work.mkdir()
    env = _clean_env()
    out = _run([str(py), "-c", INSTALLED_CHECK, str(venv), str(ROOT)], cwd=work, env=env).stdout
    assert out.startswith("ok " + str(site)), out

    import json

    rep_env = json.loads(_run([str(py), "-m", "resnet_fast.env", "--json"], cwd=work, env=env).stdout)
    assert rep_env["resnet_fast_path"] == str(site / "resnet_fast"), rep_env["resnet_fast_path"]
    assert rep_env["backends"]["cpu"]["fp32"]["auto"] == "torch"

    help_text = _run([str(py), "-m", "resnet_fast.kernel_report", "--help"], cwd=work, env=env).stdout
    assert "--layers" in help_text and "--arch" in help_text

    # one layer, one backend, one config: the Triton ahead-of-time compile needs no GPU
    rep = work / "r.json"
    out = _run([str(py), "-m", "resnet_fast.kernel_report", "--arch", "sm_90a", "--backend", "triton",
                "--triton-configs", "m128n128k64w8s4", "--model", "resnet18", "--batch", "8",
                "--layers", r"layer2\.1\.conv1$", "--quiet", "--jobs", "1",
                "--cubin-dir", str(work / "cubins"), "--json", str(rep)], cwd=work, env=env).stdout
    data = json.loads(rep.read_text())
    rows = data["rows"]
    # the inference kernel and the train() variant (conv + statistics epilogue) of the layer
    assert sorted(r["layer"]["epilogue"] for r in rows) == ["relu", "stats"], out
    for r in rows:
        assert r["backend"] == "triton" and r["arch"] == "sm_90a" and not r.get("error"), r
        assert r["layer"]["names"] == ["layer2.1.conv1"] and r["registers"] > 0, r
    # the other training kernels ship in the wheel and compile too
    assert data["training_kernels"] and all(k["ok"] for k in data["training_kernels"]), data["training_kernels"]


def test_sdist_carries_tests_benchmarks_license_and_sources(tmp_path):
    src = _copy_tree(tmp_path / "src")
    out = tmp_path / "sdist"
    out.mkdir()
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
          "print(build_meta.build_sdist(sys.argv[1]))", str(out)], cwd=src, env=_clean_env())
    (sdist,) = out.glob("resnet_fast-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    want = {"LICENSE", "setup.py", "pyproject.toml", "MANIFEST.in", "tests/conftest.py",
            "tests/reference.py", "resnet_fast/py.typed", "benchmarks/__init__.py", "benchmarks/report.py"}
    want |= {f"csrc/{f.name}" for f in (ROOT / "csrc").iterdir() if any(f.match(p) for p in PKG_DATA)}
    want |= {f"tests/gpu/{f.relative_to(ROOT / 'tests' / 'gpu').as_posix()}"
             for f in (ROOT / "tests" / "gpu").rglob("*.py") if "__pycache__" not in f.parts}
    want |= {f"tests/{f.name}" for f in (ROOT / "tests").glob("*.py")}
    missing = sorted(want - names)
    assert not missing, f"left out of the sdist: {missing}"
    assert not any("__pycache__" in n or n.endswith((".so", ".cubin")) for n in names)
