"""The backend registry: one table of backends, and the choice among them.

Choice order, most specific first: the ``backend=`` argument of a call, the backend set on a
module, the ``RESNET_FAST_BACKEND`` environment variable, then ``"auto"``. ``"auto"`` takes the
first backend of :data:`AUTO_ORDER` that is available for the tensor's device and dtype and
supports the call, and logs once why it passed over the others. A backend named explicitly
that cannot run on the device at all raises; one that cannot take a particular call (e.g.
grouped convs, or the pre-activation prologue on ``cuda``) falls back, for that call, to the
first backend of :data:`AUTO_ORDER` that can (``torch`` at the latest), logged once with the
reason. Where more than one kernel backend takes a conv on a CUDA device, ``"auto"`` runs the
one measured faster for that conv's shapes on this GPU (:mod:`.measured`; measured once, kept
on disk; ``RESNET_FAST_AUTO=order`` keeps the fixed order).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

import torch

from . import measured
from .base import Backend

log = logging.getLogger("resnet_fast")


class _UnconfiguredHandler(logging.StreamHandler):
    """stderr, for as long as the application has configured no logging of its own (then the
    records propagate to its handlers as usual)."""

    def emit(self, record):
        if not logging.getLogger().handlers:
            super().emit(record)


# Long first-use steps (a CUDA build, Triton autotuning) say what they are doing at INFO, which
# shows by default; RESNET_FAST_LOG_LEVEL (e.g. WARNING) or log.setLevel quiets it.
if not log.handlers:
    _handler = _UnconfiguredHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
    log.setLevel(os.environ.get("RESNET_FAST_LOG_LEVEL", "INFO").upper())

#: name -> "module:Class", imported on first use so that e.g. the CUDA build never runs at import
_REGISTRY: dict[str, str] = {
    "torch": "resnet_fast.backends.torch_backend:TorchBackend",
    "triton": "resnet_fast.backends.triton_backend:TritonBackend",
    "cuda": "resnet_fast.backends.cuda_backend:CudaBackend",
}
#: preference of "auto" (where it does not measure: see resolve): on an H100 (2026-11-25, README's per-layer table) the Triton kernels
#: win every 1x1, the stem and stage 1's 3x3 and sum to 8.67 ms over ResNet-50's convs against
#: the CUTLASS kernels' 12.81 ms (which win or tie stage 2-4's 3x3 by 0-12 %); torch is the
#: reference math, last
AUTO_ORDER = ("triton", "cuda", "torch")
ENV_VAR = "RESNET_FAST_BACKEND"
NAMES = tuple(_REGISTRY) + ("auto",)

_instances: dict[str, Backend] = {}
_said: set[str] = set()


def say_once(msg: str, level: int = logging.INFO) -> None:
    """Log a fallback or choice message once per process (they repeat every layer otherwise).

    Silent while torch.compile traces: dynamo cannot trace a logger call, and an eager call of
    the same module has said it already or will."""
    if torch.compiler.is_compiling():
        return
    if msg not in _said:
        _said.add(msg)
        log.log(level, msg)


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES}")
    be = _instances.get(name)
    if be is None:
        mod, cls = _REGISTRY[name].split(":")
        be = _instances[name] = getattr(importlib.import_module(mod), cls)()
    return be


def validate_name(name: Optional[str]) -> Optional[str]:
    if name is not None and name != "auto" and name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES}")
    return name


def default_name() -> str:
    return validate_name(os.environ.get(ENV_VAR) or None) or "auto"


def available(name: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether backend ``name`` can run on device/dtype, and why not; never builds anything
    (resolve() prepares the backend it picks)."""
    try:
        return get(name).available(torch.device(device), dtype)
    except Exception as e:  # a backend that cannot even import is not available, with the reason
        return False, f"{type(e).__name__}: {e}"


def ready(name: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """:func:`available`, then the backend's prepare step (which may build: the cuda backend
    compiles its extension once per machine); what resolve() asks of the backend it picks."""
    ok, why = available(name, device, dtype)
    if ok:
        try:
            ok, why = get(name).prepare(torch.device(device))
        except Exception as e:  # noqa: BLE001 - reported, like a failed import
            ok, why = False, f"{type(e).__name__}: {e}"
    return ok, why


def _takers(x: torch.Tensor, weight, groups: int, pre: bool, skip: Optional[str] = None):
    """Walk AUTO_ORDER: (name, ok, why) for each backend but ``skip``, ok when it is available
    for x, supports the call and is ready (prepare: the one step that may build)."""
    for cand in AUTO_ORDER:
        if cand == skip:
            continue
        ok, why = available(cand, x.device, x.dtype)
        if ok:
            ok, why = get(cand).supports(x, weight, groups, pre=pre)
        if ok:
            ok, why = get(cand).prepare(x.device)
        yield cand, ok, why


def resolve(name: Optional[str], x: torch.Tensor, weight: Optional[torch.Tensor] = None,
            groups: int = 1, pre: bool = False, call: Optional[tuple] = None) -> Backend:
    """The backend that runs a call on x (see the module doc for the order of choice); ``pre``:
    the call has a pre-activation prologue. ``call``: (stride, padding, dilation, residual,
    relu) of a conv; with it, ``auto`` on a CUDA device picks among the kernel backends that
    take the conv the one measured fastest for its shapes (:mod:`resnet_fast.backends.measured`).

    A Backend object passes through unchanged: the caller already resolved it for this call.
    """
    if isinstance(name, Backend):
        return name
    name = validate_name(name) or default_name()
    if name == "auto":
        if call is not None and weight is not None and measured.can_measure(x) and measured.enabled():
            picked = _measured(x, weight, groups, pre, call)
            if picked is not None:
                return picked
        reasons = []
        for cand, ok, why in _takers(x, weight, groups, pre):
            if ok:
                if reasons:
                    # landing on the reference math on a GPU is worth a warning; on the CPU it
                    # is the expected default, said only to those who ask (DEBUG)
                    if cand == "torch":
                        level = logging.WARNING if x.device.type == "cuda" else logging.DEBUG
                    else:
                        level = logging.INFO
                    say_once(f"resnet_fast: auto picked {cand!r} for {x.device.type}/{x.dtype} "
                             f"({'; '.join(reasons)})", level)
                return get(cand)
            reasons.append(f"{cand}: {why}")
        raise RuntimeError("no backend can run this call: " + "; ".join(reasons))
    be = get(name)
    ok, why = be.available(x.device, x.dtype)
    if ok:
        ok, why = be.prepare(x.device)
    if not ok:
        raise RuntimeError(f"backend {name!r} cannot run on {x.device.type} with {x.dtype}: {why}")
    ok, why = be.supports(x, weight, groups, pre=pre)
    if ok:
        return be
    # the fastest backend that can take this call; torch takes every call
    cand = next((c for c, took, _ in _takers(x, weight, groups, pre, skip=name) if took), None)
    if cand is None:
        raise RuntimeError(f"backend {name!r} cannot take this call ({why}) and no other backend can")
    say_once(f"resnet_fast: backend {name!r} falls back to {cand!r} for this call: {why}", logging.WARNING)
    return get(cand)


def fp8_backend(name, device: torch.device) -> Backend:
    """The backend that runs fp8 convs (resnet_fast.fp8_ops) on ``device``: ``name``'s when it
    has an fp8 kernel there (an explicit name that has none is an error), else for ``auto`` the
    first kernel backend that has one, else the reference (said once, with why)."""
    if isinstance(name, Backend):
        return name
    name = validate_name(name) or default_name()
    if name != "auto":
        be = get(name)
        ok, why = be.fp8_support(device)
        if not ok:
            raise RuntimeError(f"backend {name!r} cannot run fp8 convs on {torch.device(device).type}: {why}")
        return be
    reasons = []
    for cand in ("triton",):
        ok, why = get(cand).fp8_support(device)
        if ok:
            return get(cand)
        reasons.append(f"{cand}: {why}")
    say_once(f"resnet_fast: fp8 convs run the reference ops ({'; '.join(reasons)})",
             logging.WARNING if torch.device(device).type == "cuda" else logging.DEBUG)
    return get("torch")


def _measured(x, weight, groups, pre, call) -> Optional[Backend]:
    """The measured choice among two or more kernel backends taking the call, else None."""
    takers = [get(c) for c, ok, _ in _takers(x, weight, groups, pre) if ok and c != "torch"]
    if len(takers) < 2:
        return None
    stride, padding, dilation, residual, relu = call
    conv = measured.ConvCall(tuple(x.shape), tuple(weight.shape[:1]) + (x.shape[1] // groups,) + tuple(weight.shape[2:]),
                             tuple(stride), tuple(padding), tuple(dilation), groups, x.dtype,
                             bool(residual), bool(relu), pre)
    return measured.choose(takers, conv, x.device)


def _import_all() -> None:
    # Import every backend now, not on first use: a lazy importlib call inside a forward breaks
    # torch.compile(fullgraph=True) when the first call of a model is the compiled one. A backend
    # that fails to import stays unavailable, with the reason, through `available`.
    for name in _REGISTRY:
        try:
            get(name)
        except Exception:  # noqa: BLE001 - reported by available()
            pass


_import_all()
