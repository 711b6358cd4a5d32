"""Conv problems the kernel tests share: ResNet-50's distinct convs, argument builders, the
float64 reference and a direct launch of the Triton kernel."""

import torch

from resnet_fast import ops

CL = torch.channels_last

_EPILOGUE_CODES = {"relu": "relu", "residual+relu": "res", "none": "none"}


def _resnet50_convs():
    """The distinct convs of torchvision's ResNet-50 (v1.5: stride on the 3x3) at 224x224, read
    off the converter's fusion plan (through the kernel report's layer list, on the meta device):
    (Cin, Cout, k, stride, padding, input H=W, epilogue), epilogue "relu" after the stem and a
    bottleneck's conv1/conv2, "res" (residual + relu) after conv3, "none" for the downsample."""
    from resnet_fast.kernel_report.layers import distinct_layers

    layers, _ = distinct_layers("resnet50", batch=2, resolution=224)
    return [(d["cin"], d["cout"], d["kernel"][0], d["stride"][0], d["padding"][0], d["h"],
             _EPILOGUE_CODES[d["epilogue"]]) for d in layers]


RESNET50_CONVS = _resnet50_convs()


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
