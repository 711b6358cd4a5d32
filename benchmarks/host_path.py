"""Host time per conv call of a converted model's eval() forward, with the kernel launch stubbed.

    TRITON_INTERPRET=1 python -m benchmarks.host_path [--model resnet50|timm:resnetv2_50] [--repeats 9]

What it measures is the Python on the path from a converted module's forward to the kernel
launch (the fused modules, the never-stale fold cache's checks, argument checks, backend
dispatch, the launcher's Python), i.e. what the CPU spends per conv before any GPU work is
queued. The Triton kernels are replaced by stand-ins that launch nothing, so the figure holds no
kernel and no Triton launch (JITFunction.run); the model's other layers (average pool, fc) run for real on tiny inputs. Prints the median over ``--repeats`` runs of ``--forwards`` forwards, in µs per conv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend is then available on the CPU

import torch  # noqa: E402
from torch import nn  # noqa: E402


def _model(name: str) -> nn.Module:
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False, num_classes=10)
    import torchvision

    return getattr(torchvision.models, name)(num_classes=10)


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_kernel():
    """Every Triton kernel a converted eval() forward launches, replaced by _NoLaunch: what is
    left is resnet_fast's Python from the module call to the kernel call (Triton's own launch
    cost, JITFunction.run or the direct launch, is not in the figure)."""
    from resnet_fast.kernels import conv_bn_act, layout, max_pool

    conv_bn_act.conv_bn_act_kernel = _NoLaunch()
    layout.to_nhwc_padded_kernel = _NoLaunch()
    max_pool.max_pool2d_nhwc_kernel = _NoLaunch()


def measure(model_name: str, forwards: int, repeats: int, size: int) -> dict:
    import resnet_fast

    _stub_kernel()
    model = resnet_fast.convert(_model(model_name).eval(), backend="triton")
    convs = sum(1 for r in resnet_fast.fusion_summary(model) if r.get("runs_fused", r["fused"]))
    x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.no_grad():
        for _ in range(3):
            model(x)  # folds, signature checks, Triton launch records
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(forwards):
                model(x)
            times.append((time.perf_counter() - start) / forwards)
    per_forward = statistics.median(times)
    return {"model": model_name, "convs_on_op": convs, "us_per_forward": per_forward * 1e6,
            "us_per_conv": per_forward * 1e6 / convs, "forwards": forwards, "repeats": repeats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="torchvision name, or timm:<name>")
    p.add_argument("--forwards", type=int, default=100)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--size", type=int, default=16, help="input height and width")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    r = measure(args.model, args.forwards, args.repeats, args.size)
    print(f"{r['model']}: {r['us_per_conv']:.1f} us per conv ({r['us_per_forward']:.0f} us per forward, "
          f"{r['convs_on_op']} convs on the op; median of {r['repeats']} x {r['forwards']} forwards)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
