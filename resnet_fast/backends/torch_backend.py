"""The reference backend: plain torch math from :mod:`resnet_fast.ops`, any device and dtype."""

from __future__ import annotations

import torch

from .. import ops
from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    requires_nhwc = False

    def available(self, device, dtype):
        return True, ""

    def pack_weight(self, w):
        # F.conv2d picks its own layout; keep the weight as the caller holds it.
        return w

    def conv_bn_act(self, x, weight, bias, stride, padding, dilation, groups,
                    residual, relu, pre_scale, pre_bias):
        return ops.conv_bn_act_reference(x, weight, bias, stride, padding, dilation, groups,
                                         residual, relu, pre_scale, pre_bias)

    def fp8_support(self, device):
        return True, ""  # the reference: dequantize, fp32 conv, requantize

    def add_relu(self, a, b):
        return ops.add_relu_reference(a, b)

    def add_relu_(self, a, b):
        torch.relu_(a.add_(b))
