"""A whole training step in one CUDA graph: forward, loss, backward and optimizer step.

A converted ResNet's training step is a few hundred kernel launches (its forward, the statistics
finalizes, the backward's dgrad/wgrad and BatchNorm passes, the optimizer), so at the batch sizes
that fit one GPU the CPU issuing them is a visible share of the step. :class:`TrainingStep`
records the step once and then replays it::

    model = resnet_fast.convert(torchvision.models.resnet50()).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)   # Adam/AdamW: capturable=True
    step = resnet_fast.train_graphs.capture_training_step(model, opt, nn.CrossEntropyLoss(), x0, y0)
    for x, y in loader:
        loss = step(x, y)      # copies x, y in, replays; the parameters, BatchNorm buffers and
                               # optimizer state are updated in place, as an eager step would

What a call does
----------------
``step(x, y)`` copies the batch into the graph's static inputs (one graph per input signature:
shape, strides, dtype, device of x and y), replays, and returns the loss (a fresh tensor, so the
next step does not overwrite it). Every ``.grad`` afterwards holds that step's gradients. The
step is ``optimizer.zero_grad(set_to_none=True); loss = loss_fn(model(x), y); loss.backward();
optimizer.step()``, under autocast when ``autocast_dtype`` is given (bf16: no GradScaler, which
synchronizes with the host and cannot be captured).

BatchNorm running statistics, ``num_batches_tracked`` (and ``momentum=None``'s cumulative
average, read from it on the device) are updated in place by every replay, as are the optimizer's
state tensors (its ``step`` counters too, with ``capturable=True``).

Capture
-------
On a side stream, ``warmup`` eager steps (they build, autotune and allocate the optimizer's
state), then the recorded one, as PyTorch's whole-network capture recipe does. None of them may
change what training computes: the parameters, buffers and optimizer state are saved before the
warm-ups and written back (in place: the graph holds their addresses) after the capture, so the
first replay is the first step. Optimizer state the warm-ups created is written back as a fresh
optimizer's first step would find it: zeros, ``step`` 0 (SGD without dampening, Adam, AdamW;
other optimizers must have taken one eager step before the capture, so their state exists).

Never stale
-----------
What a replay reads are device addresses: the parameters, buffers, optimizer state, the folded
tensors of frozen units (their fold caches), and the Python numbers the capture baked in (a
float learning rate, momentum, betas, eps). Before every replay the step compares the model's
signature (:class:`resnet_fast.graphs.CudaGraphRunner`'s: module identities and classes, train()
flags, hooks, backends, every parameter and buffer's identity, version counter and storage, the
fold generation, the environment and TF32 switches) and the optimizer's (its parameter lists,
every hyperparameter: numbers by value, tensors by identity and storage, since a graph reads a
tensor learning rate live; every state tensor's identity, version and storage) with those it
captured under. A difference means a change the graph cannot see: ``on_change="recapture"``
(the default) captures again (warm-ups and write-back as above), ``"error"`` raises
:class:`resnet_fast.graphs.StaleGraphError` saying what changed. So a weight written outside
the graph (``p.copy_``, ``load_state_dict``, ``nn.init``, a new Parameter), a float learning rate
changed by a scheduler, or ``model.eval()`` is never silently ignored. (A learning-rate schedule
without recaptures: give the optimizer a tensor ``lr`` on the device, which schedulers fill in
place and the graph reads live.) Writes PyTorch does not record (through ``.data``, DLPack)
cannot be seen: call :func:`resnet_fast.refresh` after them, which the step sees. Optimizer
steps elsewhere in the process (which invalidate the fold caches) do not recapture: a replay
reads trainable parameters live, and no optimizer writes a frozen one.

A replay writes parameters without bumping their version counters, so after each one the step
invalidates every fold cache: eager eval() forwards and inference graph runners then refold
from the trained weights.

Distributed
-----------
SyncBatchNorm's statistics collectives (resnet_fast.distributed) run on the current stream and
keep the global count on the device, so they capture. DDP needs PyTorch's own recipe for
captured backward passes (NCCL >= 2.9.6, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0``, DDP built and
``warmup >= 11`` eager iterations on the side stream so its buckets are rebuilt before capture).

A step is not thread-safe; call it from one thread and one stream at a time.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import fold
from .graphs import StaleGraphError, _CudaGraphs, _held_by_units, _Snapshot, _tensors_in

__all__ = ["TrainingStep", "capture_training_step"]

log = logging.getLogger("resnet_fast")

ON_CHANGE = ("recapture", "error")

#: optimizers whose lazily created state, all zeros (and ``step`` 0), is what their first step
#: reads: the state the warm-ups created is written back that way
_ZERO_STATE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


# --------------------------------------------------------------------------------------
# The seam: everything that needs a CUDA device (the CPU tests substitute an object like this)
# --------------------------------------------------------------------------------------
class _CudaTrainingGraphs(_CudaGraphs):
    """Captures and replays a training step with ``torch.cuda.CUDAGraph``.

    ``capture(step, device, warmup=, pool=)`` runs ``step(False)`` ``warmup`` times on a side
    stream, then records ``step(True)``; returns ``(loss, replay, handle)``. ``record_use``,
    ``new_pool``, ``release``: as the inference runner's."""

    def check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device: the batch is on {device.type}; "
                             f"move the model and its inputs with .cuda()")

    def new_pool(self, device: torch.device):
        return torch.cuda.graph_pool_handle()

    def capture(self, step: Callable, device: torch.device, *, warmup: int, pool):
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step(False)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    loss = step(True)
            except Exception as e:
                raise RuntimeError(
                    f"capturing the training step into a CUDA graph failed ({type(e).__name__}: {e}). "
                    f"Something in it cannot be captured: a host synchronization (.item(), a "
                    f"GradScaler, an optimizer without capturable=True, a data-dependent shape), "
                    f"work on a CPU tensor, or a build or autotuning step the warm-ups did not reach") from e
        return loss, graph.replay, graph


# --------------------------------------------------------------------------------------
# State: saved before the warm-ups, written back after the capture; the optimizer's signature
# --------------------------------------------------------------------------------------
def _value_signature(v: Any):
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v.data_ptr())  # read live by the graph: its values may change
    if isinstance(v, (list, tuple)):
        return tuple(_value_signature(x) for x in v)
    if isinstance(v, (int, float, bool, str, type(None))):
        return v
    return ("object", id(v))


def _tensor_signature(t: torch.Tensor):
    return (id(t), t.data_ptr(), t._version)


def optimizer_signature(opt: torch.optim.Optimizer) -> tuple:
    """What of ``opt`` a captured step baked in (see the module doc)."""
    groups = tuple((tuple(map(id, g["params"])),
                    tuple(sorted((k, _value_signature(v)) for k, v in g.items() if k != "params")))
                   for g in opt.param_groups)
    state = tuple((id(p), tuple(sorted((k, _tensor_signature(v) if isinstance(v, torch.Tensor) else _value_signature(v))
                                       for k, v in s.items())))
                  for p, s in opt.state.items())
    return groups, state


class _SavedState:
    """Copies of the model's parameters and buffers and the optimizer's state, to write back
    in place after the warm-ups and the capture."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer):
        with torch.no_grad():
            self.tensors = [(t, t.detach().clone()) for t in _model_tensors(model)]
            self.state = {p: {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                              for k, v in s.items()} for p, s in opt.state.items()}
        self.had_state = set(opt.state)

    def restore(self, opt: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)
            for p, s in opt.state.items():
                before = self.state.get(p)
                for k, v in list(s.items()):
                    if before is None or k not in before:  # created by the warm-ups: fresh
                        if isinstance(v, torch.Tensor):
                            v.zero_()
                        continue
                    old = before[k]
                    if isinstance(v, torch.Tensor):
                        v.copy_(old)
                    else:
                        s[k] = old


def _model_tensors(model: nn.Module) -> list:
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _check_optimizer(opt: torch.optim.Optimizer, model: nn.Module) -> None:
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(opt).__name__}")
    for g in opt.param_groups:
        if g.get("capturable") is False and not g.get("fused"):
            raise ValueError(f"{type(opt).__name__} must be created with capturable=True (or "
                             f"fused=True) to be captured into a CUDA graph: its step counters "
                             f"otherwise live on the host")
        if g.get("differentiable"):
            raise ValueError("a differentiable optimizer cannot be captured")
    params = {id(p) for p in model.parameters()}
    if not any(id(p) in params for g in opt.param_groups for p in g["params"]):
        raise ValueError("the optimizer holds none of the model's parameters")
    fresh = [p for g in opt.param_groups for p in g["params"] if p.requires_grad and p not in opt.state]
    if fresh and not isinstance(opt, _ZERO_STATE_OPTIMIZERS):
        raise ValueError(
            f"{type(opt).__name__} has no state yet for some parameters, and what its first step "
            f"finds is not known to be zeros: take one eager step before capturing (only SGD, "
            f"Adam and AdamW start from zero state)")
    if fresh and isinstance(opt, torch.optim.SGD):
        for g in opt.param_groups:
            if g.get("momentum", 0) and g.get("dampening", 0):
                raise ValueError(
                    "SGD with momentum and dampening starts its momentum buffer from the first "
                    "gradient undamped, which a captured (later) step cannot reproduce: take one "
                    "eager step before capturing")


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------
class _Graph:
    __slots__ = ("inputs", "loss", "replay", "handle", "grads", "held")

    def __init__(self, inputs, loss, replay, handle, grads, held):
        self.inputs, self.loss, self.replay, self.handle = inputs, loss, replay, handle
        self.grads = grads  # (parameter, its .grad as captured): assigned back after a replay
        self.held = held    # the folded tensors (and storages) the graph reads


class TrainingStep:
    """``model``'s training step, replayed from CUDA graphs: ``step(x, y)`` (see the module doc).

    ``loss_fn(output, target)`` gives the scalar loss. ``warmup``: eager steps before each
    capture (>= 1; their effects are undone). ``autocast_dtype``: run the step under
    ``torch.autocast`` in that dtype (e.g. torch.bfloat16). ``on_change``: ``"recapture"``
    (default) or ``"error"``. Attributes: ``captures``, ``num_graphs``, ``last_change``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                 warmup: int = 3, autocast_dtype: Optional[torch.dtype] = None, pool=None,
                 on_change: str = "recapture", _backend=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"TrainingStep takes an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(output, target) -> scalar loss")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        if on_change not in ON_CHANGE:
            raise ValueError(f"on_change must be one of {ON_CHANGE}, got {on_change!r}")
        _check_optimizer(optimizer, model)
        self._backend = _backend if _backend is not None else _CudaTrainingGraphs()
        self._backend.check_available()
        self._model, self._opt, self._loss_fn = model, optimizer, loss_fn
        self.warmup, self.autocast_dtype, self.on_change = warmup, autocast_dtype, on_change
        self._pool = pool
        self._graphs: dict = {}
        self._snap: Optional[_Snapshot] = None
        self._opt_sig = None
        self._current: Optional[_Graph] = None
        self.captures = 0
        self.last_change: Optional[str] = None

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._opt

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, x: torch.Tensor, target) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"TrainingStep takes a tensor batch, got {type(x).__name__}")
        key = (_key(x), _key(target))
        if self._graphs:
            why = self._change()
            if why is not None:
                if self.on_change == "error":
                    raise StaleGraphError(
                        f"the model or optimizer changed since the training step was captured: "
                        f"{why}. Call step.reset() to capture again (or use on_change='recapture')")
                self._drop(why)
        g = self._graphs.get(key)
        if g is None:
            g = self._capture(x, target, key)
        _copy_in(g.inputs, (x, target))
        g.replay()
        if g is not self._current:  # another graph's replay: its gradients are the live ones
            for p, grad in g.grads:
                p.grad = grad
            self._current = g
        # the replay wrote parameters without bumping version counters: every fold cache (and
        # inference graph runner) refolds
        fold.invalidate()
        return g.loss.clone()

    def reset(self) -> None:
        """Drop every graph (the next call captures again)."""
        self._drop("reset()", quiet=True)

    def __repr__(self) -> str:
        return (f"TrainingStep({type(self.model).__name__}, {type(self._opt).__name__}, "
                f"graphs={self.num_graphs}, captures={self.captures}, on_change={self.on_change!r})")

    # -- internals --------------------------------------------------------------------------
    def _change(self) -> Optional[str]:
        if not self._snap.unchanged():
            return self._snap.describe_change()
        if optimizer_signature(self._opt) != self._opt_sig:
            return _describe_optimizer_change(self._opt_sig, optimizer_signature(self._opt))
        return None

    def _drop(self, why: str, quiet: bool = False) -> None:
        graphs = list(self._graphs.values())
        self._graphs.clear()
        self._snap, self._opt_sig, self._current = None, None, None
        if graphs:
            self.last_change = why
            log.log(logging.DEBUG if quiet else logging.INFO,
                    "resnet_fast: dropping %d training-step CUDA graph(s) of %s, to capture again: %s",
                    len(graphs), type(self.model).__name__, why)
        self._backend.release([g.handle for g in graphs])

    def _capture(self, x: torch.Tensor, target, key) -> _Graph:
        model, opt = self._model, self._opt
        self._backend.check_device(x.device)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.device != x.device:
                raise ValueError(f"the batch is on {x.device} but {name!r} is on {t.device}: move "
                                 f"the model with model.to({str(x.device)!r})")
        _check_optimizer(opt, model)
        with torch.no_grad():
            inputs = (_static_like(x), _static_like(target))
            _copy_in(inputs, (x, target))
        pool = self._pool if self._pool is not None else self._backend.new_pool(x.device)
        saved = _SavedState(model, opt)
        loss_fn, dtype = self._loss_fn, self.autocast_dtype

        def step(capturing: bool) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            verify, fold._verify = fold._verify, (fold._verify and not capturing)
            try:
                if dtype is not None:
                    with torch.autocast(x.device.type, dtype=dtype):
                        loss = loss_fn(model(inputs[0]), inputs[1])
                else:
                    loss = loss_fn(model(inputs[0]), inputs[1])
            finally:
                fold._verify = verify
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise ValueError("loss_fn must return a one-element tensor")
            loss.backward()
            opt.step()
            return loss.detach()

        with torch.enable_grad():
            loss, replay, handle = self._backend.capture(step, x.device, warmup=self.warmup, pool=pool)
        grads = [(p, p.grad) for g in opt.param_groups for p in g["params"] if p.grad is not None]
        saved.restore(opt)   # the warm-ups and the capture changed nothing the replays will see
        del saved
        graph = _Graph(inputs, loss, replay, handle, grads, _held_by_units(model.modules()))
        # made on the warm-ups' side stream, read on the caller's from now on
        self._backend.record_use(_tensors_in(graph.held) + [g for _, g in grads])
        self._snap = _TrainingSnapshot(model)
        self._opt_sig = optimizer_signature(opt)
        self._graphs[key] = graph
        self._current = graph
        self.captures += 1
        return graph


class _TrainingSnapshot(_Snapshot):
    """The inference runner's model signature, but with the count of explicit
    :func:`resnet_fast.refresh` calls where it has the fold generation: optimizer steps (this
    graph's replays, or other optimizers') bump the generation, and change nothing a training
    graph reads stale (it reads the parameters live; frozen ones no optimizer writes)."""

    def measure(self) -> tuple:
        m = super().measure()
        return ((fold._refreshes,) + m[0][1:],) + m[1:]


def _describe_optimizer_change(before, now) -> str:
    (g0, s0), (g1, s1) = before, now
    if len(g0) != len(g1) or any(a[0] != b[0] for a, b in zip(g0, g1)):
        return "the optimizer's parameter groups changed"
    for i, (a, b) in enumerate(zip(g0, g1)):
        if a[1] != b[1]:
            da, db = dict(a[1]), dict(b[1])
            k = next(k for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k))
            return f"the optimizer's param_groups[{i}][{k!r}] changed ({da.get(k)!r} -> {db.get(k)!r})"
    return "the optimizer's state was modified or replaced outside the graph"


def _key(t) -> tuple:
    if isinstance(t, torch.Tensor):
        return (t.shape, t.stride(), t.dtype, t.device)
    raise TypeError(f"the target must be a tensor, got {type(t).__name__}")


def _static_like(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.empty_like(t)


def _copy_in(static: tuple, batch: tuple) -> None:
    with torch.no_grad():
        for s, b in zip(static, batch):
            if b is not s:
                s.copy_(b.detach())


def capture_training_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                          example_input: torch.Tensor, example_target: torch.Tensor,
                          **kwargs: Any) -> TrainingStep:
    """A :class:`TrainingStep` with its graph captured now for the example batch's signature
    (no training happens: the capture's effects are undone, the first call is the first step)."""
    step = TrainingStep(model, optimizer, loss_fn, **kwargs)
    key = (_key(example_input), _key(example_target))
    step._capture(example_input, example_target, key)
    return step
