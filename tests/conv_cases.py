"""Conv problems the kernel tests share: ResNet-50's distinct convs, argument builders, the
float64 reference and a direct launch of the Triton kernel."""

import torch

from resnet_fast import ops

CL = torch.channels_last

# The distinct convs of torchvision's ResNet-50 (v1.5: stride on the 3x3) at 224x224:
# (Cin, Cout, k, stride, padding, input H=W, epilogue), epilogue as in the model: "relu" after
# the stem and a bottleneck's conv1/conv2, "res" (residual + relu) after conv3, "none" for the
# downsample conv.
RESNET50_CONVS = [
    (3, 64, 7, 2, 3, 224, "relu"),
    (64, 64, 1, 1, 0, 56, "relu"), (64, 64, 3, 1, 1, 56, "relu"), (64, 256, 1, 1, 0, 56, "res"),
    (64, 256, 1, 1, 0, 56, "none"), (256, 64, 1, 1, 0, 56, "relu"),
    (256, 128, 1, 1, 0, 56, "relu"), (128, 128, 3, 2, 1, 56, "relu"), (128, 512, 1, 1, 0, 28, "res"),
    (256, 512, 1, 2, 0, 56, "none"), (512, 128, 1, 1, 0, 28, "relu"), (128, 128, 3, 1, 1, 28, "relu"),
    (512, 256, 1, 1, 0, 28, "relu"), (256, 256, 3, 2, 1, 28, "relu"), (256, 1024, 1, 1, 0, 14, "res"),
    (512, 1024, 1, 2, 0, 28, "none"), (1024, 256, 1, 1, 0, 14, "relu"), (256, 256, 3, 1, 1, 14, "relu"),
    (1024, 512, 1, 1, 0, 14, "relu"), (512, 512, 3, 2, 1, 14, "relu"), (512, 2048, 1, 1, 0, 7, "res"),
    (1024, 2048, 1, 2, 0, 14, "none"), (2048, 512, 1, 1, 0, 7, "relu"), (512, 512, 3, 1, 1, 7, "relu"),
]


def make_conv(cin, cout, k, stride, pad, h, w, n, dtype, residual, pre=False, dilation=1, device="cpu"):
    """Keyword arguments of one conv_bn_act call: fresh random NHWC tensors (weights scaled so
    outputs stay O(1)), fp32 per-channel vectors."""
    x = torch.randn(n, cin, h, w, device=device).to(dtype).contiguous(memory_format=CL)
    weight = (torch.randn(cout, cin, k, k, device=device) / (cin * k * k) ** 0.5).to(dtype)
    args = dict(x=x, weight=weight.contiguous(memory_format=CL), bias=torch.randn(cout, device=device),
                stride=[stride] * 2, padding=[pad] * 2, dilation=[dilation] * 2,
                residual=None, pre_scale=None, pre_bias=None)
    if residual:
        ho, wo = ops.conv_output_hw(h, w, k, k, args["stride"], args["padding"], args["dilation"])
        args["residual"] = torch.randn(n, cout, ho, wo, device=device).to(dtype).contiguous(memory_format=CL)
    if pre:
        # A large positive shift on half the channels: relu(0 * scale + shift) > 0 there, so a
        # kernel that padded before the transform would be caught on every padded border.
        args["pre_scale"] = torch.rand(cin, device=device) + 0.5
        args["pre_bias"] = torch.where(torch.arange(cin, device=device) % 2 == 0, 3.0,
                                       0.5 * torch.randn(cin, device=device))
    return args


def reference(args, relu, dtype):
    """ops.conv_bn_act_reference with the tensors in dtype (per-channel vectors in its accumulator type)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    per_channel = ("bias", "pre_scale", "pre_bias")
    up = {k: v.to(acc if k in per_channel else dtype) if isinstance(v, torch.Tensor) else v
          for k, v in args.items()}
    return ops.conv_bn_act_reference(groups=1, relu=relu, **up)


def launch(args, relu, **kw):
    """The Triton launcher called directly (no registry, no op): what the kernel tests check."""
    from resnet_fast.kernels import conv_bn_act as conv_kernels

    a = dict(args)
    return conv_kernels.conv_bn_act(a.pop("x"), a.pop("weight"), a.pop("bias"), a.pop("stride"),
                                    a.pop("padding"), a.pop("dilation"), relu=relu, **a, **kw)
