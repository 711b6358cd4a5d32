"""What a backend is: a small object implementing the op contract of :mod:`resnet_fast.ops`."""

from __future__ import annotations

import torch


class Backend:
    """One implementation of the two ops. Subclasses fill in the methods below.

    ``available`` answers for a device and dtype (can this backend run here at all), without
    side effects; ``supports`` answers for one call's shape (e.g. grouped convs a kernel does not
    cover); ``prepare`` makes the backend ready to run (a build, a load), called by the dispatcher
    for the backend it picks. All return ``(ok, reason)`` so the dispatcher can say why it fell
    back.
    """

    name = "base"
    #: whether x/residual must already be NHWC in memory (kernels read raw pointers)
    requires_nhwc = True

    def available(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        raise NotImplementedError

    def prepare(self, device: torch.device) -> tuple[bool, str]:
        """Make the backend ready to run on ``device`` (build or load what it needs); cheap once
        it is. Nothing to do by default."""
        return True, ""

    def supports(self, x: torch.Tensor, weight: torch.Tensor | None, groups: int,
                 pre: bool = False) -> tuple[bool, str]:
        """Whether this backend's kernel takes the call (``pre``: with a pre-activation prologue)."""
        return True, ""

    def pack_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The folded weight in the layout this backend's kernel reads (OHWI by default)."""
        return w.contiguous(memory_format=torch.channels_last)

    def input_channels(self, cin: int, groups: int) -> int:
        """How many input channels this backend's inference kernel wants for a conv over
        ``cin`` channels: more than ``cin`` where it reads a zero-padded input faster (the
        Triton stem: 3 -> 4). The fold pads the packed weight with zero input channels to match
        (:func:`resnet_fast.fold.pack_folded`) and :meth:`kernel_input` pads the input."""
        return cin

    def kernel_input(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """x as this backend's kernel reads it: NHWC where it requires it, and zero-padded to
        ``channels`` where that is what :meth:`input_channels` makes of x's own channel count
        (one pass when it must convert at all). Any other channel count passes unchanged, for
        the op's argument checks to refuse."""
        if self.requires_nhwc and not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def conv_bn_act(self, x, weight, bias, stride, padding, dilation, groups,
                    residual, relu, pre_scale, pre_bias) -> torch.Tensor:
        raise NotImplementedError

    def prepare_conv(self, x, weight, bias, stride, padding, dilation, groups, residual, relu,
                     pre_scale, pre_bias):
        """A callable ``run(x, weight, bias, residual, pre_scale, pre_bias) -> y`` repeating this
        call (which has just run and passed the op's checks) for tensors of the same shapes,
        dtypes, devices and layouts, without the per-call work a fresh call redoes; the fused
        modules keep it per conv (their host path). This default repeats conv_bn_act itself."""
        stride, padding, dilation = list(stride), list(padding), list(dilation)

        def run(x, weight, bias, residual, pre_scale, pre_bias):
            return self.conv_bn_act(x, weight, bias, stride, padding, dilation, groups, residual, relu,
                                    pre_scale, pre_bias)
        return run

    def add_relu(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def max_pool2d(self, x, kernel_size, stride, padding, dilation, ceil_mode) -> torch.Tensor:
        """F.max_pool2d's values (the op contract's ``max_pool2d``); torch's pool by default."""
        from ..ops import max_pool2d_reference
        return max_pool2d_reference(x, kernel_size, stride, padding, dilation, ceil_mode)

    def fp8_support(self, device: torch.device) -> tuple[bool, str]:
        """Whether this backend has an fp8 (e4m3) conv kernel for ``device``
        (:mod:`resnet_fast.fp8_ops`); where not, fp8 inference runs the reference."""
        return False, f"backend {self.name!r} has no fp8 conv kernel"

    def conv_bn_act_fp8(self, x, weight, bias, w_scale, x_scale, stride, padding, dilation, groups,
                        residual, res_scale, relu, out_scale, out_dtype) -> torch.Tensor:
        """The fp8 op of the contract (:mod:`resnet_fast.fp8_ops`); the reference by default."""
        from ..fp8_ops import REFERENCE_OP
        return REFERENCE_OP(x, weight, bias, w_scale, x_scale, stride, padding, dilation, groups,
                            residual, res_scale, relu, out_scale, out_dtype)

    def training_ops(self, device: torch.device, dtype: torch.dtype):
        """The :class:`resnet_fast.train_ops.TrainingOps` a training forward on this backend runs
        (batch statistics, the BN apply and the block tail). The reference ops by default."""
        from ..train_ops import REFERENCE_OPS
        return REFERENCE_OPS

    def add_relu_(self, a: torch.Tensor, b: torch.Tensor) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<resnet_fast backend {self.name!r}>"
