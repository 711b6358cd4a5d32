"""The op contract that every backend implements.

Two ops, one meaning:

    conv_bn_act(x, weight, bias, stride, padding, dilation, groups,
                residual=None, relu=True, pre_scale=None, pre_bias=None) -> y
        y = act(conv(pre(x), weight) + bias [+ residual])
        pre(x) = relu(x * pre_scale + bias_in) per input channel when pre_scale is given
        (the pre-activation prologue; the zero padding of the conv applies *after* it).
    add_relu(a, b) -> relu(a + b)        add_relu_(a, b): the same, written into a.

Tensors: x, residual and y are 4-D NHWC in memory (``torch.channels_last``);
weight is the conv weight (Cout, Cin/groups, kh, kw) with the BN scale folded in, in the
dtype of x, in whatever memory format the backend packed it into; bias, pre_scale, pre_bias
are per-channel float32 (float64 when x is float64).

This module holds the schemas, the one fake (meta) implementation, the one reference
implementation in plain torch, the one backward (registered for every backend's op, so the ops
compose with autograd whichever backend runs the forward), the argument checks shared by every
backend, and dispatch by backend name. Backends register one custom op per op under the ``resnet_fast`` namespace with
:func:`define_backend_ops`, so ``torch.compile``, ``torch.export`` and CUDA graphs see one
shape of op whichever backend runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .backends.base import Backend

NAMESPACE = "resnet_fast"

CONV_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor bias, int[] stride, int[] padding, int[] dilation, "
    "int groups, Tensor? residual, bool relu, Tensor? pre_scale, Tensor? pre_bias) -> Tensor"
)
ADD_RELU_SCHEMA = "(Tensor a, Tensor b) -> Tensor"
ADD_RELU_INPLACE_SCHEMA = "(Tensor(a!) a, Tensor b) -> ()"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------
# Shapes and argument checks (the one copy; backends call these, never re-implement them)
# --------------------------------------------------------------------------------------
def conv_output_hw(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def pair(v: int | Sequence[int], name: str = "value") -> list[int]:
    """[a, b] from an int or a sequence of one or two ints (conv arguments, shapes)."""
    if isinstance(v, int):
        return [v, v]
    v = [int(e) for e in v]
    if len(v) == 1:
        return [v[0], v[0]]
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v}")
    return v


def same_memory_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b can be walked as flat buffers of one order: both contiguous or both
    channels_last (what the add_relu kernels need)."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    return is_nhwc(a) and is_nhwc(b)


def is_nhwc(t: torch.Tensor) -> bool:
    """True when t's memory is NHWC (channels fastest), the layout every kernel reads."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def check_tensor_args(op: str, required: dict, optional: dict = {}) -> None:  # noqa: B006 - read only
    """TypeError naming the first argument that is not a tensor (None allowed in ``optional``)."""
    for name, t in required.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in optional.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")


def _check_conv_tensors(x, weight, bias, residual, pre_scale, pre_bias, bias_optional=False) -> None:
    required = {"x": x, "weight": weight} if bias_optional else {"x": x, "weight": weight, "bias": bias}
    optional = {"residual": residual, "pre_scale": pre_scale, "pre_bias": pre_bias}
    if bias_optional:
        optional["bias"] = bias
    check_tensor_args("conv_bn_act", required, optional)


def check_conv_bn_act_args(x, weight, bias, stride, padding, dilation, groups, residual,
                           pre_scale, pre_bias, *, require_nhwc: bool,
                           bias_optional: bool = False) -> tuple[int, int, int, int]:
    """Validate one call of conv_bn_act; returns the output shape (N, Cout, Ho, Wo).
    ``bias_optional``: bias may be None (the training conv, train_ops.conv_stats).

    Raises TypeError/ValueError/RuntimeError with a message a user can act on, so that no
    kernel ever sees an argument it would fault on.
    """
    _check_conv_tensors(x, weight, bias, residual, pre_scale, pre_bias, bias_optional)
    if x.dim() != 4:
        raise ValueError(f"conv_bn_act expects a 4-D input (N, C, H, W), got a {x.dim()}-D "
                         f"tensor of shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"conv_bn_act expects a floating-point input, got {x.dtype}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (Cout, Cin/groups, kh, kw), got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match input dtype {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual),
                    ("pre_scale", pre_scale), ("pre_bias", pre_bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name} is on {t.device} but the input is on {x.device}; "
                               f"move the module with .to({x.device})")
    n, c, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    if groups < 1 or c % groups or cout % groups:
        raise ValueError(f"groups={groups} must divide both input channels {c} and output channels {cout}")
    if cin_g * groups != c:
        raise ValueError(f"input has {c} channels but the weight expects {cin_g * groups} "
                         f"(weight shape {tuple(weight.shape)}, groups={groups})")
    if any(s < 1 for s in stride) or any(p < 0 for p in padding) or any(d < 1 for d in dilation):
        raise ValueError(f"invalid stride {stride}, padding {padding} or dilation {dilation}")
    ho, wo = conv_output_hw(h, w, kh, kw, stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input {h}x{w} is too small for a {kh}x{kw} kernel with padding "
                         f"{padding} and dilation {dilation}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if (bias is not None or not bias_optional) and (bias.shape != (cout,) or bias.dtype != acc):
        raise ValueError(f"bias must be a ({cout},) {acc} tensor, got {tuple(bias.shape)} {bias.dtype}")
    if (pre_scale is None) != (pre_bias is None):
        raise ValueError("pre_scale and pre_bias go together: give both or neither")
    if pre_scale is not None:
        for name, t in (("pre_scale", pre_scale), ("pre_bias", pre_bias)):
            if t.shape != (c,) or t.dtype != acc:
                raise ValueError(f"{name} must be a ({c},) {acc} tensor, got {tuple(t.shape)} {t.dtype}")
    if residual is not None:
        if residual.shape != (n, cout, ho, wo):
            raise ValueError(f"residual has shape {tuple(residual.shape)} but the conv output is "
                             f"{(n, cout, ho, wo)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} does not match input dtype {x.dtype}")
    if require_nhwc:
        if not is_nhwc(x):
            raise ValueError("x must be NHWC in memory: pass x.contiguous(memory_format=torch.channels_last)")
        if residual is not None and not is_nhwc(residual):
            raise ValueError("residual must be NHWC in memory (torch.channels_last)")
    return n, cout, ho, wo


def empty_nhwc(like: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialised NHWC tensor of ``shape`` with like's dtype and device."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def check_add_relu_args(a: torch.Tensor, b: torch.Tensor) -> None:
    check_tensor_args("add_relu", {"a": a, "b": b})
    if a.shape != b.shape:
        raise ValueError(f"add_relu needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"add_relu needs tensors of one dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise RuntimeError(f"add_relu needs tensors on one device, got {a.device} and {b.device}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"add_relu expects floating-point tensors, got {a.dtype}")


# --------------------------------------------------------------------------------------
# The reference implementation (plain torch: any device, any float dtype; also what the
# `torch` backend runs). Epilogue math in float32 (float64 for float64 inputs), like the kernels.
# --------------------------------------------------------------------------------------
def conv_bn_act_reference(x, weight, bias, stride, padding, dilation, groups,
                          residual=None, relu=True, pre_scale=None, pre_bias=None):
    acc = bias.dtype
    if x.shape[1] == 0:  # no input channels: the conv sums nothing, y = act(bias [+ residual])
        n, _, h, w = x.shape
        ho, wo = conv_output_hw(h, w, weight.shape[2], weight.shape[3], stride, padding, dilation)
        y = bias.view(1, -1, 1, 1).expand(n, -1, ho, wo)
        if residual is not None:
            y = y + residual.to(acc)
        y = torch.relu(y) if relu else y
        return y.to(x.dtype).contiguous(memory_format=torch.channels_last)
    if pre_scale is not None:
        x = torch.relu(x.to(acc) * pre_scale.view(1, -1, 1, 1) + pre_bias.view(1, -1, 1, 1)).to(x.dtype)
    if x.dtype == acc:
        # fp32/fp64: the conv adds the bias itself and the epilogue runs in place on its fresh
        # output, one pass fewer each than the general path below (what the CPU default runs)
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        if residual is not None:
            y.add_(residual)
        return y.relu_() if relu else y
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups).to(acc)
    y = y + bias.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)


def add_relu_reference(a, b):
    return torch.relu(a + b)


# --------------------------------------------------------------------------------------
# The one fake (meta) implementation, shared by every backend's registered op.
# --------------------------------------------------------------------------------------
def conv_bn_act_fake(x, weight, bias, stride, padding, dilation, groups,
                     residual=None, relu=True, pre_scale=None, pre_bias=None):
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = conv_output_hw(h, w, kh, kw, stride, padding, dilation)
    return empty_nhwc(x, (n, cout, ho, wo))


def add_relu_fake(a, b):
    return torch.empty_like(a)


def add_relu_inplace_fake(a, b):
    return None


# --------------------------------------------------------------------------------------
# The one backward, in torch ops (cuDNN's conv backward on a GPU), registered for every
# backend's forward op: the ops compose with autograd whichever backend runs the forward.
# --------------------------------------------------------------------------------------
_X, _WEIGHT, _BIAS, _RESIDUAL, _PRE_SCALE, _PRE_BIAS = 0, 1, 2, 7, 9, 10


def conv_backward(grad, x, weight, stride, padding, dilation, groups, output_mask):
    """(grad_x, grad_weight) of conv2d(x, weight) for the output gradient ``grad``, through
    ``aten.convolution_backward`` (cuDNN on a GPU). On the CPU the tensors go in NCHW: oneDNN's
    channels_last backward returns a wrong weight gradient for 1x1 stride-2 convs in fp32
    (relative error ~0.8 against float64 with torch 2.14.1; tests/test_training.py keeps it
    checked), a bug of the same family as pytorch#68868."""
    if x.device.type == "cpu":
        grad, x, weight = grad.contiguous(), x.contiguous(), weight.contiguous()
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
        [bool(output_mask[0]), bool(output_mask[1]), False])
    return gx, gw


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, residual, relu, pre_scale, pre_bias = inputs
    ctx.conv = (list(stride), list(padding), list(dilation), groups, relu, residual is not None)
    ctx.save_for_backward(x, weight, pre_scale, pre_bias, output if relu else None)


def _conv_backward(ctx, grad):
    x, weight, pre_scale, pre_bias, y = ctx.saved_tensors
    stride, padding, dilation, groups, relu, has_residual = ctx.conv
    need = ctx.needs_input_grad
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = grad.to(acc)
    if relu:
        g = g * (y > 0)  # relu(v) > 0 exactly where v > 0
    grads = [None] * 11
    if need[_BIAS]:
        grads[_BIAS] = g.sum((0, 2, 3))
    if has_residual and need[_RESIDUAL]:
        grads[_RESIDUAL] = g.to(x.dtype)
    pre = pre_scale is not None
    if pre:
        z = x.to(acc) * pre_scale.view(1, -1, 1, 1) + pre_bias.view(1, -1, 1, 1)
        x_in = torch.relu(z).to(x.dtype)
    else:
        x_in = x
    want_x = need[_X] or (pre and (need[_PRE_SCALE] or need[_PRE_BIAS]))
    if want_x or need[_WEIGHT]:
        gx, gw = conv_backward(g.to(x.dtype), x_in, weight, stride, padding, dilation, groups,
                               (want_x, need[_WEIGHT]))
        grads[_WEIGHT] = gw
        if pre and gx is not None:
            gz = gx.to(acc) * (z > 0)
            grads[_X] = (gz * pre_scale.view(1, -1, 1, 1)).to(x.dtype) if need[_X] else None
            grads[_PRE_SCALE] = (gz * x.to(acc)).sum((0, 2, 3)) if need[_PRE_SCALE] else None
            grads[_PRE_BIAS] = gz.sum((0, 2, 3)) if need[_PRE_BIAS] else None
        else:
            grads[_X] = gx
    return tuple(grads)


def _add_relu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _add_relu_backward(ctx, grad):
    (y,) = ctx.saved_tensors
    g = grad * (y > 0)
    return g, g


def define_backend_ops(suffix: str, conv_impl=None, add_relu_impl=None, add_relu_inplace_impl=None,
                       dispatch_key: str = "CompositeExplicitAutograd"):
    """Define resnet_fast::{conv_bn_act,add_relu,add_relu_inplace}_<suffix> with the shared
    schemas and fake, and register the given Python implementations (a backend whose kernels
    are registered from C++ passes None and registers them with TORCH_LIBRARY_IMPL).

    Returns (conv_op, add_relu_op, add_relu_inplace_op) as torch.ops overloads.
    """
    lib = _libraries.get(suffix)
    if lib is None:
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        names = {"conv_bn_act": CONV_SCHEMA, "add_relu": ADD_RELU_SCHEMA,
                 "add_relu_inplace": ADD_RELU_INPLACE_SCHEMA}
        fakes = {"conv_bn_act": conv_bn_act_fake, "add_relu": add_relu_fake,
                 "add_relu_inplace": add_relu_inplace_fake}
        impls = {"conv_bn_act": conv_impl, "add_relu": add_relu_impl,
                 "add_relu_inplace": add_relu_inplace_impl}
        for op, schema in names.items():
            qual = f"{op}_{suffix}"
            lib.define(qual + schema)
            torch.library.register_fake(f"{NAMESPACE}::{qual}", fakes[op], lib=lib)
            if impls[op] is not None:
                lib.impl(qual, impls[op], dispatch_key)
        # add_relu_inplace mutates its input: no autograd formula (ops.add_relu_ refuses
        # inputs that need one)
        torch.library.register_autograd(f"{NAMESPACE}::conv_bn_act_{suffix}", _conv_backward,
                                        setup_context=_conv_setup_context, lib=lib)
        torch.library.register_autograd(f"{NAMESPACE}::add_relu_{suffix}", _add_relu_backward,
                                        setup_context=_add_relu_setup_context, lib=lib)
        _libraries[suffix] = lib
    ns = getattr(torch.ops, NAMESPACE)
    return (getattr(ns, f"conv_bn_act_{suffix}").default,
            getattr(ns, f"add_relu_{suffix}").default,
            getattr(ns, f"add_relu_inplace_{suffix}").default)


_libraries: dict[str, torch.library.Library] = {}


# --------------------------------------------------------------------------------------
# The max-pool after a stem: values only (eager CUDA writes int64 indices inference drops)
# --------------------------------------------------------------------------------------
MAX_POOL_SCHEMA = ("(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
                   "bool ceil_mode) -> Tensor")


def max_pool2d_reference(x, kernel_size, stride, padding, dilation, ceil_mode):
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def max_pool2d_fake(x, kernel_size, stride, padding, dilation, ceil_mode):
    # torch's own shape rule (on the fake tensor), in the kernels' memory format
    shape = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode).shape
    return empty_nhwc(x, tuple(shape)) if is_nhwc(x) else x.new_empty(shape)


def define_max_pool_op(suffix: str, impl):
    """resnet_fast::max_pool2d_<suffix>: the schema, the shared fake and ``impl``. Inference
    only (no autograd formula): :func:`max_pool2d` takes torch's pool where autograd records."""
    qual = f"max_pool2d_{suffix}"
    lib = _libraries.get("pool_" + suffix)
    if lib is None:
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        lib.define(qual + MAX_POOL_SCHEMA)
        torch.library.register_fake(f"{NAMESPACE}::{qual}", max_pool2d_fake, lib=lib)
        lib.impl(qual, impl, "CompositeExplicitAutograd")
        _libraries["pool_" + suffix] = lib
    return getattr(getattr(torch.ops, NAMESPACE), qual).default


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False, *,
               backend: Union[str, "Backend", None] = None) -> torch.Tensor:
    """F.max_pool2d's values (no indices) on the chosen backend: the Triton kernel for NHWC
    inputs, torch's pool otherwise and wherever autograd records (the kernel has no backward)."""
    from .backends import resolve

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"max_pool2d expects a tensor, got {type(x).__name__}")
    kernel_size = pair(kernel_size, "kernel_size")
    stride = kernel_size if stride is None or stride == () or stride == [] else pair(stride, "stride")
    padding, dilation = pair(padding, "padding"), pair(dilation, "dilation")
    if torch.is_grad_enabled() and x.requires_grad:
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    return resolve(backend, x).max_pool2d(x, kernel_size, stride, padding, dilation, bool(ceil_mode))


# --------------------------------------------------------------------------------------
# Public entry points: dispatch by backend.
# --------------------------------------------------------------------------------------
def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                dilation: int | Sequence[int] = 1, groups: int = 1,
                residual: Optional[torch.Tensor] = None, relu: bool = True,
                pre_scale: Optional[torch.Tensor] = None, pre_bias: Optional[torch.Tensor] = None, *,
                backend: Union[str, "Backend", None] = None) -> torch.Tensor:
    """Fused conv + folded BN (+ residual) (+ ReLU) on the chosen backend (see module doc).

    ``backend``: a name (see :mod:`resnet_fast.backends`), a Backend object already resolved
    by the caller, or None for the default choice.
    """
    from .backends import resolve

    _check_conv_tensors(x, weight, bias, residual, pre_scale, pre_bias)
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    be = resolve(backend, x, weight=weight, groups=groups, pre=pre_scale is not None,
                 call=(stride, padding, dilation, residual is not None, relu))
    out_shape = check_conv_bn_act_args(x, weight, bias, stride, padding, dilation, groups,
                                       residual, pre_scale, pre_bias, require_nhwc=be.requires_nhwc)
    return run_checked_conv_bn_act(be, out_shape, x, weight, bias, stride, padding, dilation, groups,
                                   residual, relu, pre_scale, pre_bias)


def run_checked_conv_bn_act(be, out_shape, x, weight, bias, stride, padding, dilation, groups,
                            residual, relu, pre_scale, pre_bias):
    """conv_bn_act on backend ``be`` for arguments that passed :func:`check_conv_bn_act_args`
    (which returned ``out_shape``): :func:`conv_bn_act` after its checks, and the fused modules,
    which check a conv's call signature once and then only compare it."""
    if out_shape[0] == 0:  # an empty batch launches nothing
        return empty_nhwc(x, out_shape)
    return be.conv_bn_act(x, weight, bias, stride, padding, dilation, groups,
                          residual, relu, pre_scale, pre_bias)


def direct_call_ok(x: torch.Tensor, *others) -> bool:
    """Whether an eager call on x (and the tensors ``others``) may run a backend's Python kernel
    directly instead of through its torch.library op (the dispatcher round trip costs ~10 us a
    call, a tenth of a small conv).

    Only for a plain tensor with nothing watching the dispatcher: torch.compile / torch.export
    tracing, jit tracing, a TorchDispatchMode (FakeTensorMode, FlopCounterMode, ...) and the
    profiler must all see the op, so each of them takes the op; so does a call autograd must
    record (the op carries the backward).
    """
    # is_compiling() first: under torch.compile it is a constant and the rest is never traced
    return (not torch.compiler.is_compiling() and type(x) is torch.Tensor
            and not torch._C._len_torch_dispatch_stack() and not torch.jit.is_tracing()
            and not torch.autograd._profiler_enabled()
            and not (torch.is_grad_enabled() and _any_requires_grad(x, others)))


def _any_requires_grad(x: torch.Tensor, others) -> bool:
    return x.requires_grad or any(t is not None and t.requires_grad for t in others)


def add_relu(a: torch.Tensor, b: torch.Tensor, *,
             backend: Union[str, "Backend", None] = None) -> torch.Tensor:
    """relu(a + b) on the chosen backend."""
    from .backends import resolve

    check_add_relu_args(a, b)
    if a.numel() == 0:
        return torch.empty_like(a)
    return resolve(backend, a).add_relu(a, b)


def add_relu_(a: torch.Tensor, b: torch.Tensor, *,
              backend: Union[str, "Backend", None] = None) -> torch.Tensor:
    """a <- relu(a + b) on the chosen backend; returns a. Records no autograd: for inputs that
    need gradients use :func:`add_relu`."""
    from .backends import resolve

    check_add_relu_args(a, b)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        raise RuntimeError("add_relu_ writes into a and records no autograd, but an input requires "
                           "grad: use add_relu(a, b), or call it under torch.no_grad()")
    if a.numel():
        resolve(backend, a).add_relu_(a, b)
    return a
