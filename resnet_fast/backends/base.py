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

    def conv_bn_act(self, x, weight, bias, stride, padding, dilation, groups,
                    residual, relu, pre_scale, pre_bias) -> torch.Tensor:
        raise NotImplementedError

    def add_relu(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_ops(self, device: torch.device, dtype: torch.dtype):
        """The :class:`resnet_fast.train_ops.TrainingOps` a training forward on this backend runs
        (batch statistics, the BN apply and the block tail). The reference ops by default."""
        from ..train_ops import REFERENCE_OPS
        return REFERENCE_OPS

    def add_relu_(self, a: torch.Tensor, b: torch.Tensor) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<resnet_fast backend {self.name!r}>"
