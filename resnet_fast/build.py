"""Prebuild the CUDA extension of the ``cuda`` backend.

    python -m resnet_fast.build                      # for the GPU of this machine
    python -m resnet_fast.build --arch sm_80 sm_90a  # for given architectures (no GPU needed)
    TORCH_CUDA_ARCH_LIST="8.0;9.0" python -m resnet_fast.build   # torch's convention, same thing

Without --arch, TORCH_CUDA_ARCH_LIST (torch's forms: "8.0;9.0a", "8.0 9.0+PTX", "Ampere", or
sm_80) names the architectures, GPU or not; 9.0 builds sm_90a (the Hopper kernels), +PTX is
dropped, and archs older than sm_80 are skipped with a note. Else the GPU of this machine.

Each architecture is a separate library (SASS for one architecture; sm_90a adds the CUTLASS 3
Hopper kernels), cached in torch's extension folder where the backend finds it on first use.
Each is built and loaded in its own child process: two builds register kernels for the same ops
and cannot share one process. The child prints one JSON line (build seconds, library, what the
dispatcher has registered), which tests/test_cuda_build.py reads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

OPS = ("conv_bn_act_cuda", "add_relu_cuda", "add_relu_inplace_cuda")


def _build_one(arch: str, verbose: bool) -> dict:
    from . import ops
    from .backends import cuda_backend

    start = time.perf_counter()
    path = cuda_backend.build(arch, verbose=verbose)
    seconds = time.perf_counter() - start
    report = {"arch": arch, "library": path, "seconds": round(seconds, 1), "ops": {}}
    for op in OPS:
        qual = f"{ops.NAMESPACE}::{op}"
        report["ops"][op] = {
            "cuda_kernel": torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"),
            "schema": str(getattr(torch.ops.resnet_fast, op).default._schema),
        }
    report["conv_configs"] = list(torch.ops.resnet_fast._cuda_conv_configs())
    report["build_info"] = torch.ops.resnet_fast._cuda_build_info()
    return report


def _archs_from_env(p: argparse.ArgumentParser) -> list[str]:
    """The archs TORCH_CUDA_ARCH_LIST names that the kernels run on ([] when it is unset)."""
    import os

    from .backends.cuda_backend import ARCH_LIST_ENV, MIN_ARCH, _arch_number, parse_arch_list

    value = os.environ.get(ARCH_LIST_ENV)
    try:
        listed = parse_arch_list(value)
    except ValueError as e:
        p.error(str(e))
    if not listed:
        return []
    archs = [a for a in listed if _arch_number(a) >= MIN_ARCH]
    skipped = [a for a in listed if a not in archs]
    if skipped:
        print(f"{ARCH_LIST_ENV}: skipping {', '.join(skipped)} (the kernels need sm_{MIN_ARCH} or newer)",
              file=sys.stderr)
    if not archs:
        p.error(f"{ARCH_LIST_ENV}={value!r} names no architecture the kernels run on (sm_{MIN_ARCH}+)")
    print(f"{ARCH_LIST_ENV}={value!r}: building {' '.join(archs)}", file=sys.stderr)
    return archs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", help="e.g. sm_80 sm_86 sm_90a (default: this machine's GPU)")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: build one arch in this process
    args = p.parse_args(argv)

    if args.one:
        print(json.dumps(_build_one(args.one, args.verbose)), flush=True)
        return 0

    archs = args.arch
    if not archs:
        archs = _archs_from_env(p)
    if not archs:
        if not torch.cuda.is_available():
            p.error("no GPU here: name the architectures with --arch (e.g. --arch sm_80 sm_90a) "
                    "or TORCH_CUDA_ARCH_LIST (e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0')")
        from .backends.cuda_backend import arch_for_capability

        archs = [arch_for_capability(*torch.cuda.get_device_capability())]
    failed = []
    for arch in archs:
        cmd = [sys.executable, "-m", "resnet_fast.build", "--one", arch] + (["--verbose"] if args.verbose else [])
        proc = subprocess.run(cmd, capture_output=not args.verbose, text=True)
        if proc.returncode != 0:
            failed.append(arch)
            print(f"{arch}: FAILED\n{(proc.stderr or '')[-6000:]}", file=sys.stderr)
            continue
        if proc.stdout:
            line = proc.stdout.strip().splitlines()[-1]
            rep = json.loads(line)
            print(f"{arch}: built in {rep['seconds']} s -> {rep['library']}\n"
                  f"  configs: {', '.join(rep['conv_configs'])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
