"""One ResNet-bottleneck-sized pass through the cuda ops, small enough to run under
compute-sanitizer in seconds:

    compute-sanitizer --tool memcheck python tests/gpu/sanitize_block.py
    compute-sanitizer --tool racecheck python tests/gpu/sanitize_block.py --no-tune

(build the extension first, e.g. `python -m resnet_fast.build`, or the sanitizer also watches the
build). Exits non-zero when a result is wrong; the sanitizer reports memory errors itself.
"""

import sys

import torch

from resnet_fast import ops
from resnet_fast.backends import cuda_backend


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    cuda_backend.ensure_loaded()
    conv, add_relu, add_relu_ = ops.define_backend_ops("cuda")
    if "--no-tune" in sys.argv:  # one kernel per call: shorter racecheck runs
        cuda_backend.force_conv_config(cuda_backend.conv_configs()[0])
    torch.manual_seed(0)
    cl = torch.channels_last
    dt = torch.bfloat16
    n, c, mid, h = 2, 256, 64, 28
    x = torch.randn(n, c, h, h, device="cuda", dtype=dt).contiguous(memory_format=cl)
    w1 = (torch.randn(mid, c, 1, 1, device="cuda") / 16).to(dt).contiguous(memory_format=cl)
    w2 = (torch.randn(mid, mid, 3, 3, device="cuda") / 24).to(dt).contiguous(memory_format=cl)
    w3 = (torch.randn(c, mid, 1, 1, device="cuda") / 8).to(dt).contiguous(memory_format=cl)
    b1, b2, b3 = (torch.randn(k, device="cuda") * 0.1 for k in (mid, mid, c))

    y1 = conv(x, w1, b1, [1, 1], [0, 0], [1, 1], 1, None, True, None, None)
    y2 = conv(y1, w2, b2, [1, 1], [1, 1], [1, 1], 1, None, True, None, None)
    y3 = conv(y2, w3, b3, [1, 1], [0, 0], [1, 1], 1, x, True, None, None)   # fused residual
    y3b = conv(y2, w3, b3, [1, 1], [0, 0], [1, 1], 1, None, False, None, None)
    y3c = add_relu(y3b, x)                                                  # unfused join
    add_relu_(y3b, x)
    torch.cuda.synchronize()

    r1 = ops.conv_bn_act_reference(x.double(), w1.double(), b1.double(), [1, 1], [0, 0], [1, 1], 1)
    r2 = ops.conv_bn_act_reference(y1.double(), w2.double(), b2.double(), [1, 1], [1, 1], [1, 1], 1)
    r3 = ops.conv_bn_act_reference(y2.double(), w3.double(), b3.double(), [1, 1], [0, 0], [1, 1], 1,
                                   x.double(), True)
    ok = True
    for name, y, r in (("conv1x1", y1, r1), ("conv3x3", y2, r2), ("conv1x1+res", y3, r3),
                       ("add_relu", y3c, r3), ("add_relu_", y3b, r3)):
        err = ((y.double() - r).abs().max() / r.abs().max()).item()
        good = bool(torch.isfinite(y).all()) and err < 2e-2
        ok &= good
        print(f"{name:12s} rel err {err:.2e} {'ok' if good else 'WRONG'}")
    print("kernel choices:", *cuda_backend.conv_choices(), sep="\n  ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
