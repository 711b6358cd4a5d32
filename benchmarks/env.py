"""The environment recorded with every result: a figure without its machine is not evidence.

The version fields (python, platform, torch, torchvision, triton, timm, cutlass, cuda, cudnn, nvcc)
come from :func:`resnet_fast.env.versions`, the report users paste into bug reports
(``python -m resnet_fast.env``); the rest (commit, command, GPU, torch's math flags) is the
benchmark's own.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

import torch


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(repo: str) -> dict:
    if os.environ.get("RESNET_FAST_COMMIT"):
        # The caller names the commit of a copied tree (the lent GPU machine): that copy may have
        # no .git, or the .git of an older checkout, so it outranks what git says there.
        return {"commit": os.environ["RESNET_FAST_COMMIT"],
                "dirty": os.environ.get("RESNET_FAST_DIRTY", "unknown"),
                "commit_source": "RESNET_FAST_COMMIT"}
    commit = _run(["git", "rev-parse", "HEAD"], repo)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo)
    return {"commit": commit or "none (no commit yet or not a git checkout)",
            "dirty": bool(status) if status is not None else None, "commit_source": "git"}


def gpu_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"gpu": None}
    p = torch.cuda.get_device_properties(device)
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                   f"--id={device.index or 0}"])
    return {
        "gpu": p.name,
        "gpu_count": torch.cuda.device_count(),
        "capability": f"{p.major}.{p.minor}",
        "sm_count": p.multi_processor_count,
        "memory_gb": round(p.total_memory / 2**30, 1),
        "l2_mb": round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None,
        "driver": driver.splitlines()[0] if driver else None,
    }


SHARED = ("python", "platform", "torch", "torchvision", "triton", "timm", "cutlass", "cuda", "cudnn")


def collect(device: torch.device, repo: str, argv: list[str]) -> dict:
    from resnet_fast import env as rf_env

    versions = rf_env.versions()
    env = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "benchmarks.report", *argv]),
        **{k: versions[k] for k in SHARED},
        "nvcc": rf_env.toolchain()["nvcc_version"],
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "env_vars": {k: os.environ[k] for k in ("RESNET_FAST_BACKEND", "TRITON_INTERPRET",
                                                  "CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR",
                                                  "TORCH_CUDA_ARCH_LIST")
                     if k in os.environ},
    }
    env.update(gpu_info(device))
    env.update(git_state(repo))
    return env
