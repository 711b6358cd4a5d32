"""CUDA graphs for a converted model's eval() forward: one replay instead of ~50 kernel launches.

A converted ResNet at a small batch is bound by the CPU: each conv is a kernel launch and a
Python call, and the GPU waits between them. :class:`CudaGraphRunner` records the whole
forward once per input signature into a CUDA graph and afterwards replays it::

    model = resnet_fast.convert(torchvision.models.resnet50()).eval().cuda().bfloat16()
    runner = resnet_fast.graphs.capture(model, example)   # captures now for example's signature
    y = runner(x)                                          # copy x in, replay, clone the output out

What a call does
----------------
* **One graph per input signature**: (shape, strides, dtype, device) of ``x``, plus whether
  autocast is on (and its dtype). Each graph owns a *static input* (allocated with x's strides,
  so channels_last stays channels_last) and a *static output*. A call copies ``x`` into that
  signature's static input, replays, and returns the output. ``x`` is never aliased: writing to
  it afterwards changes nothing, and it may be freed at once.
* **The output**: with ``clone_output=True`` (the default) a fresh tensor (one device copy of
  the logits: [N, 1000] for a classifier, negligible next to the forward). With
  ``clone_output=False`` the static output itself, zero copy: it is **overwritten by the next
  call with the same signature**, so consume (or clone) it before then. Calls with other
  signatures never touch it, nor does a recapture (which allocates new outputs). Outputs that
  are tuples, lists or dicts of tensors are handled alike.
* **Zero-copy input**: :meth:`CudaGraphRunner.static_input` returns the static input for a
  signature; fill it in place and call ``runner(buf)`` with that very tensor, and the input copy
  is skipped as well.
* **Inference only**: capture and replay run under ``torch.no_grad()``; outputs carry no
  autograd history. A model (or any submodule) in train() is refused: capturing a training step
  is a different feature (``torch.cuda.make_graphed_callables``).

Capture
-------
On a side stream, ``warmup`` (default 3, at least 1) eager forwards first, then one forward under
``torch.cuda.graph``, as PyTorch's CUDA-graph notes require. The warm-up forwards are also where
everything that must not happen while capturing happens: the first-use CUDA build, Triton
autotuning (its benchmarking synchronizes), backend resolution, and filling the fold caches
(:mod:`resnet_fast.fold`) with the folded weights, so the captured forward only *reads* them.
``RESNET_FAST_VERIFY_FOLDS`` checks run in the warm-ups and are paused for the capture (they
compare on the host). All graphs of a runner share one memory pool (``pool``, default a fresh
``torch.cuda.graph_pool_handle()`` per device): each graph's static output stays alive, so the
graphs only share scratch memory, which is safe because calls replay one at a time on the
caller's stream. Module hooks run while capturing only, never on a replay.

Never stale
-----------
A graph holds device addresses: of the folded weights in the fold caches, and of every
parameter and buffer the forward reads directly. Change any of them and a replay would quietly
compute with the old ones. So on **every** call the runner compares a signature of the model's
state with the one it captured under, and on any difference drops all its graphs and captures
again (``on_change="recapture"``, the default; only the signatures called again are recaptured,
on demand; each drop is logged at INFO on the ``resnet_fast`` logger and kept in
``runner.last_change``), or raises :class:`StaleGraphError` (``on_change="error"``). The
signature is, for the whole module tree:

* every module's identity (in tree order, so a replaced submodule shows), class (``convert``
  and ``parametrize`` change it in place), ``training`` flag, hook dicts (forward, forward-pre,
  backward, backward-pre: an added or a removed hook), ``backend``
  (:func:`resnet_fast.set_backend`), fused-graph state, and ``eps`` where it has one (folded
  into the weights);
* every parameter and buffer slot's tensor identity (``load_state_dict(assign=True)``, a new
  ``nn.Parameter``), version counter and ``data_ptr()``. The version counter catches in-place
  writes through the tensor or anything sharing its counter: ``torch.no_grad()`` edits,
  ``p.copy_``, ``p[:] = v``, ``p.detach().mul_``, ``model.state_dict()[k].mul_``, ``nn.init``,
  loop and foreach optimizer steps, ``load_state_dict`` (which copies in place).
  ``data_ptr()`` catches new storage without a version bump: ``p.data = t``,
  ``model.to()``/``.half()``, ``torch.utils.swap_tensors``. The runner holds the storages it
  captured with, so no new tensor can reuse their address and look unchanged. A train()
  forward of a BatchNorm updates its running statistics without bumping their counters but
  increments ``num_batches_tracked`` in place, which shows (a BatchNorm without
  ``num_batches_tracked`` is never fold-cached: its fold is recorded into the graph, which
  then reads the live statistics);
* the fold caches' process-wide generation, bumped by :func:`resnet_fast.refresh` and after
  every optimizer step of any optimizer in the process (``fused=True`` optimizers bump no
  version counter), the ``RESNET_FAST_BACKEND`` and ``RESNET_FAST_AUTO`` variables, global
  module hooks, and the TF32 switches (``torch.backends.cudnn.allow_tf32``,
  ``torch.backends.cuda.matmul.allow_tf32``).

What it cannot see are writes PyTorch itself does not record: in place through ``.data`` (that
tensor has a fresh version counter), ``.numpy()``, DLPack or ``untyped_storage()``, or into a
tensor whose storage a parameter took by ``.data`` assignment (``vector_to_parameters``); edits
of tensors created under ``torch.inference_mode`` (they have no version counter); tensors
held as plain attributes rather than registered parameters or buffers; non-tensor attributes
other than those listed (a conv's ``stride``, a flag of your own module); and code (a
``forward`` replaced on the class or the instance). After such changes call
:func:`resnet_fast.refresh` (which the runner sees) or :meth:`CudaGraphRunner.reset`.

The check is O(modules + tensors), iterated in C (``map`` with item getters over the modules'
``__dict__``): about 0.1-0.2 ms for a ResNet-50 (151 modules, 320 tensors) on the slow shared
2-core VM it was written on, ~0.08 ms for a ResNet-18; :meth:`CudaGraphRunner.check_seconds`
measures it on yours. It runs *after* the replay is launched, on the CPU while the GPU works,
so it adds latency only where it is longer than the replay; a replay found stale that way is
discarded (it read only tensors the runner keeps alive) and the call captures and replays
again. ``on_change="unchecked"`` skips the check for those who call ``reset()`` themselves
after every change. Even then nothing a graph reads is freed while it lives (the runner holds
the folded tensors and the storages), so a forgotten reset gives stale numbers, never garbage.

A runner is not thread-safe; call it from one thread and one stream at a time.
"""

from __future__ import annotations

import logging
import os
import time
from itertools import chain
from operator import attrgetter, is_, itemgetter
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from . import backends, fold
from .fold import FoldCache
from .fx_fusion import STATE_ATTR, FusedGraph
from .modules import UnitState

try:  # backend resolution reads these variables on every call (RESNET_FAST_AUTO where it exists)
    from .backends import measured as _measured
    _ENV_VARS = (backends.ENV_VAR, _measured.ENV_VAR)
except ImportError:  # pragma: no cover - a tree without measured backend choice
    _ENV_VARS = (backends.ENV_VAR,)

__all__ = ["CudaGraphRunner", "StaleGraphError", "capture"]

log = logging.getLogger("resnet_fast")

ON_CHANGE = ("recapture", "error", "unchecked")


class StaleGraphError(RuntimeError):
    """The model changed since its CUDA graphs were captured (raised with on_change="error")."""


# --------------------------------------------------------------------------------------
# The seam: everything that needs a CUDA device (tests substitute an object of this shape)
# --------------------------------------------------------------------------------------
class _CudaGraphs:
    """Captures and replays with ``torch.cuda.CUDAGraph``.

    ``capture(fn, static_input, warmup=, pool=)`` returns ``(static_output, replay, handle)``:
    ``fn(x, capturing)`` is the forward (``capturing`` False for the warm-ups, True for the
    recorded call), ``replay()`` reruns the recording, ``handle`` keeps it alive.
    """

    name = "cuda"

    def check_available(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device, and torch.cuda.is_available() is False")

    def check_input(self, x: torch.Tensor) -> None:
        if x.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device: the input is on {x.device.type}; "
                             f"move the model and its inputs with .cuda()")

    def new_pool(self, device: torch.device):
        return torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable, static_input: torch.Tensor, *, warmup: int, pool):
        with torch.cuda.device(static_input.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(static_input, False)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    out = fn(static_input, True)
            except Exception as e:
                raise RuntimeError(
                    f"capturing the forward into a CUDA graph failed ({type(e).__name__}: {e}). "
                    f"Something in it cannot be captured: a host synchronization (.item(), .cpu(), "
                    f"printing a tensor, a data-dependent shape), work on a CPU tensor, or a build "
                    f"or autotuning step the warm-ups did not reach") from e
        return out, graph.replay, graph

    def record_use(self, tensors: list) -> None:
        """``tensors`` were made by the warm-ups on the side stream and are read on the caller's
        stream from now on (the fold caches' folded weights): tell the allocator, so their
        memory is not reused for the side stream while the caller's stream still reads it."""
        for t in tensors:
            if t.is_cuda:
                try:
                    t.record_stream(torch.cuda.current_stream(t.device))
                except RuntimeError:  # an inference tensor: made by an eager call, not by us
                    pass

    def release(self, handles: list) -> None:
        # a replay may still run on the GPU; let it finish before its graph's memory is reused
        if handles:
            torch.cuda.synchronize()


# --------------------------------------------------------------------------------------
# The model-state signature
# --------------------------------------------------------------------------------------
_DICT = attrgetter("__dict__")
_PARAMS, _BUFFERS, _CHILDREN = itemgetter("_parameters"), itemgetter("_buffers"), itemgetter("_modules")
_TRAINING = itemgetter("training")
_HOOK_NAMES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOKS = itemgetter(*_HOOK_NAMES)
_HOOK_GETTERS = tuple(map(itemgetter, _HOOK_NAMES))
_BACKEND = itemgetter("backend")
_FX = itemgetter(STATE_ATTR)
_EPS = itemgetter("eps")
_VERSION = attrgetter("_version")
_PTR = torch.Tensor.data_ptr
_values = dict.values
_SEGMENTS = ("globals", "module classes", "training flags", "hooks", "backends", "fused graphs",
             "fused-graph backends", "eps", "versions", "storages")


def _globals() -> tuple:
    g = _nn_module
    env = os.environ
    return (fold._generation, tuple(map(env.get, _ENV_VARS)), torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
            tuple(chain(g._global_forward_hooks, g._global_forward_pre_hooks, g._global_backward_hooks,
                        g._global_backward_pre_hooks)))


def _hooks(dicts: list):
    """False when no module has a hook (the common case: a few truth tests per module), else
    every hook's id (ids are never reused, so any registration or removal shows)."""
    for get in _HOOK_GETTERS:
        if any(map(get, dicts)):
            return tuple(chain.from_iterable(chain.from_iterable(map(_HOOKS, dicts))))
    return False


def _objects(dicts: list) -> list:
    """What every parameter, buffer and submodule slot holds (None included), in tree order."""
    return list(chain(chain.from_iterable(map(_values, map(_PARAMS, dicts))),
                      chain.from_iterable(map(_values, map(_BUFFERS, dicts))),
                      chain.from_iterable(map(_values, map(_CHILDREN, dicts)))))


def _qual(module_name: str, key: str) -> str:
    return key if module_name == "<root>" else f"{module_name}.{key}"


def _object_names(names: list, dicts: list) -> list:
    """The qualified names of :func:`_objects`' slots."""
    return [_qual(n, k) for attr in ("_parameters", "_buffers", "_modules")
            for n, d in zip(names, dicts) for k in d[attr]]


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(is_, a, b))


class _Snapshot:
    """The model's state when its graphs were captured, and the means to measure it again.

    The measurement (before every replay) iterates in C: ``map`` over the modules' ``__dict__``s
    with item getters, never a Python loop per module or tensor."""

    def __init__(self, model: nn.Module):
        named = list(model.named_modules())
        self.names = [n or "<root>" for n, _ in named]
        self.mods = [m for _, m in named]
        self.dicts = dicts = list(map(_DICT, self.mods))
        for d, name in zip(dicts, self.names):
            missing = [k for k in _HOOK_NAMES + ("_parameters", "_buffers", "_modules", "training")
                       if k not in d]
            if missing:
                raise TypeError(f"module {name} lacks {missing}: was nn.Module.__init__ called?")
        self.objects = _objects(dicts)
        tensors = [(t, _qual(n, k)) for attr in ("_parameters", "_buffers")
                   for n, d in zip(self.names, dicts) for k, t in d[attr].items() if t is not None]
        self.tensors = [t for t, _ in tensors]
        self.tensor_names = [n for _, n in tensors]
        # inference tensors have no version counter (and cannot be written outside inference mode)
        self.versioned = [t for t in self.tensors if not t.is_inference()]
        self.versioned_names = [n for t, n in tensors if not t.is_inference()]

        # attributes only some modules have; one that gains such an attribute later changed
        # class (convert, set_backend on a converted module) or is not read by anything
        def having(key):
            return [d for d in dicts if key in d], [n for n, d in zip(self.names, dicts) if key in d]
        self.backend_dicts, self.backend_names = having("backend")
        self.fx_dicts, self.fx_names = having(STATE_ATTR)
        self.eps_dicts, self.eps_names = having("eps")
        self.fgs = [d[STATE_ATTR] for d in self.fx_dicts]
        # no new tensor can take the address of a storage held here (see the module doc)
        self.pins = [t.untyped_storage() for t in self.tensors]
        self.signature = self.measure()

    def measure(self) -> tuple:
        dicts = self.dicts
        return (_globals(), list(map(type, self.mods)), list(map(_TRAINING, dicts)), _hooks(dicts),
                list(map(_BACKEND, self.backend_dicts)), list(map(_FX, self.fx_dicts)),
                [getattr(fg, "backend", None) for fg in self.fgs], list(map(_EPS, self.eps_dicts)),
                list(map(_VERSION, self.versioned)), list(map(_PTR, self.tensors)))

    def unchanged(self) -> bool:
        """Whether the model is in the state it was captured in (the check before each replay)."""
        try:
            return _same_objects(_objects(self.dicts), self.objects) and self.measure() == self.signature
        except Exception:  # noqa: BLE001 - a module stripped of an attribute it had: changed
            return False

    def describe_change(self) -> str:
        """What changed, in words (the slow path, once a change is known)."""
        try:
            return self._describe_change()
        except Exception as e:  # noqa: BLE001 - see unchanged()
            return f"the model changed ({type(e).__name__}: {e})"

    def _describe_change(self) -> str:
        objects = _objects(self.dicts)
        if not _same_objects(objects, self.objects):
            names = _object_names(self.names, self.dicts)
            i = _first_difference(objects, self.objects)
            n_slots = sum(len(d["_parameters"]) + len(d["_buffers"]) for d in self.dicts)
            what = "parameter or buffer" if i < n_slots else "submodule"
            where = repr(names[i]) if i < len(names) else "slots"
            return f"{what} {where} was replaced, added or removed"
        now = self.measure()
        for seg, a, b in zip(_SEGMENTS, self.signature, now):
            if a == b:
                continue
            if seg == "globals":
                what = ("the fold generation (resnet_fast.refresh() or an optimizer step)",
                        f"the environment variables {'/'.join(_ENV_VARS)}",
                        "torch.backends.cudnn.allow_tf32", "torch.backends.cuda.matmul.allow_tf32",
                        "the global module hooks")
                j = _first_difference(a, b, eq=True)
                return f"{what[j]} changed ({a[j]!r} -> {b[j]!r})"
            if seg == "hooks":
                return "module hooks were registered or removed"
            names = {"versions": self.versioned_names, "storages": self.tensor_names,
                     "eps": self.eps_names, "backends": self.backend_names, "fused graphs": self.fx_names,
                     "fused-graph backends": self.fx_names}.get(seg, self.names)
            j = _first_difference(a, b, eq=True)
            name = names[j]
            if seg == "versions":
                return f"{name!r} was modified in place (version {a[j]} -> {b[j]})"
            if seg == "storages":
                return f"{name!r} has new storage (.data assignment, .to(), swap_tensors, ...)"
            if seg == "training flags":
                return f"module {name!r} was switched to {'train' if b[j] else 'eval'}()"
            return f"the {seg} changed at {name!r} ({a[j]!r} -> {b[j]!r})"
        return "the model changed"


def _first_difference(a, b, eq: bool = False) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if (x != y) if eq else (x is not y):
            return i
    return min(len(a), len(b))


def _unit_states(mods) -> list:
    """The fused units' states (each holding a fold cache) of ``mods``."""
    out = []
    for m in mods:
        for v in m.__dict__.values():
            if isinstance(v, UnitState):
                out.append(v)
            elif isinstance(v, FusedGraph):
                out += v.unit_states.values()
            elif isinstance(v, dict):
                out += [s for s in v.values() if isinstance(s, UnitState)]
    return out


def _held_by_units(mods) -> list:
    """What the fused units of ``mods`` hold now: the folded tensors (and whatever else a unit
    keeps for its next call) that a graph captured just now reads. Held by the graph, since a
    refold lets go of them."""
    out = []
    for s in _unit_states(mods):
        for slot in type(s).__slots__:
            v = getattr(s, slot, None)
            out.append((v._value, v._pins) if isinstance(v, FoldCache) else v)
    return out


def _tensors_in(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    return []


def _clone_tree(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        items = [_clone_tree(o) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    if isinstance(out, dict):
        return type(out)((k, _clone_tree(v)) for k, v in out.items())
    return out


# --------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------
class _Graph:
    __slots__ = ("static_input", "static_output", "replay", "handle", "held")

    def __init__(self, static_input, static_output, replay, handle, held):
        self.static_input = static_input
        self.static_output = static_output
        self.replay = replay
        self.handle = handle  # keeps the recording alive
        self.held = held      # the folded tensors it reads


class CudaGraphRunner:
    """``model``'s eval() forward, replayed from CUDA graphs: ``runner(x)`` (see the module doc).

    ``warmup``: eager forwards before each capture (at least 1: they run the autotuning and fill
    the fold caches). ``pool``: a ``torch.cuda.graph_pool_handle()`` to share with other graphs
    (default: one of the runner's own per device). ``clone_output``: return a fresh copy of the
    output (default) or the static output itself, overwritten by the next call with the same
    input signature. ``on_change``: what a call does when the model changed since capture:
    ``"recapture"`` (default), ``"error"`` (raise :class:`StaleGraphError`), or ``"unchecked"``
    (no check: call :meth:`reset` after every change yourself).

    Attributes: ``captures`` (graphs captured so far, recaptures included), ``num_graphs`` (held
    now), ``last_change`` (why the last recapture happened, or None).
    """

    def __init__(self, model: nn.Module, *, warmup: int = 3, pool=None, clone_output: bool = True,
                 on_change: str = "recapture", _backend=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"CudaGraphRunner takes an nn.Module, got {type(model).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (the warm-ups autotune and fill the fold "
                             f"caches outside capture), got {warmup!r}")
        if on_change not in ON_CHANGE:
            raise ValueError(f"on_change must be one of {ON_CHANGE}, got {on_change!r}")
        self._backend = _backend if _backend is not None else _CudaGraphs()
        self._backend.check_available()
        _refuse_training(model)
        self._model = model
        self.warmup = warmup
        self.clone_output = bool(clone_output)
        self.on_change = on_change
        self._pool = pool
        self._pools: dict = {}
        self._graphs: dict = {}
        self._snap: Optional[_Snapshot] = None
        self.captures = 0
        self.last_change: Optional[str] = None

    # -- calls ------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"CudaGraphRunner takes one tensor, got {type(x).__name__}")
        key = self._key(x)
        g = self._graphs.get(key)
        if g is None:
            g = self._graph_for(x, key)
            _feed(g, x)
            g.replay()
        else:
            _feed(g, x)
            g.replay()
            # checked while the replay runs on the GPU (it is asynchronous); a stale replay only
            # read tensors the runner keeps alive, and its result is discarded
            if self.on_change != "unchecked" and not self._snap.unchanged():
                self._changed()
                g = self._graph_for(x, key)
                _feed(g, x)
                g.replay()
        return _clone_tree(g.static_output) if self.clone_output else g.static_output

    def static_input(self, x: torch.Tensor) -> torch.Tensor:
        """The static input of ``x``'s signature (captured now if needed): fill it in place and
        pass this very tensor to the runner to skip the input copy. Valid until a recapture."""
        key = self._key(x)
        if self._graphs and self.on_change != "unchecked" and not self._snap.unchanged():
            self._changed()
        g = self._graphs.get(key)
        return (g or self._graph_for(x, key)).static_input

    def reset(self) -> None:
        """Drop every graph and the captured state (the next call captures again): after changes
        the check cannot see (see the module doc), or to free the graphs' memory."""
        self._drop("reset()", quiet=True)

    @property
    def model(self) -> nn.Module:
        """The model (fixed: the captured state is this model's; make another runner for another)."""
        return self._model

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def check_seconds(self, repeat: int = 100) -> float:
        """Seconds one state check (see the module doc) takes on this model; captures nothing."""
        snap = self._snap or _Snapshot(self.model)
        t0 = time.perf_counter()
        for _ in range(repeat):
            snap.unchanged()
        return (time.perf_counter() - t0) / repeat

    def __repr__(self) -> str:
        return (f"CudaGraphRunner({type(self.model).__name__}, graphs={self.num_graphs}, "
                f"captures={self.captures}, clone_output={self.clone_output}, on_change={self.on_change!r})")

    # -- internals --------------------------------------------------------------------------
    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        dev = x.device.type
        cast = torch.get_autocast_dtype(dev) if dev != "meta" and torch.is_autocast_enabled(dev) else None
        return x.shape, x.stride(), x.dtype, x.device, cast

    def _changed(self) -> None:
        why = self._snap.describe_change()
        if self.on_change == "error":
            raise StaleGraphError(f"the model changed since its CUDA graphs were captured: {why}. "
                                  f"Call runner.reset() to capture again (or use on_change='recapture')")
        _refuse_training(self.model)  # a model switched to train() is refused, not recaptured
        self._drop(why)

    def _graph_for(self, x: torch.Tensor, key: tuple) -> _Graph:
        """A new graph for ``key`` (no graph of the runner holds it), after checking that the
        graphs it would join are not stale."""
        if self._graphs and self.on_change != "unchecked" and not self._snap.unchanged():
            self._changed()
        return self._capture(x, key)

    def _drop(self, why: str, quiet: bool = False) -> None:
        graphs = list(self._graphs.values())  # alive, with what they read, until released
        self._graphs.clear()
        self._snap = None
        if graphs:
            self.last_change = why
            log.log(logging.DEBUG if quiet else logging.INFO, "resnet_fast: dropping %d CUDA graph(s) of %s, to capture again on demand: %s",
                     len(graphs), type(self.model).__name__, why)
        self._backend.release([g.handle for g in graphs])
        del graphs

    def _capture(self, x: torch.Tensor, key: tuple) -> _Graph:
        self._backend.check_input(x)
        model = self.model
        _refuse_training(model)
        for name, t in chain(model.named_parameters(), model.named_buffers()):
            if t.device != x.device:
                raise ValueError(f"the input is on {x.device} but {name!r} is on {t.device}: move "
                                 f"the model with model.to({str(x.device)!r})")
        # x's strides when x is dense (channels_last stays channels_last), else a dense layout;
        # a normal tensor even under inference_mode, so later calls outside it can write it
        with torch.inference_mode(False):
            static = torch.empty_like(x)
        with torch.no_grad():
            static.copy_(x)
        pool = self._pool
        if pool is None:
            pool = self._pools.get(x.device)
            if pool is None:
                pool = self._pools[x.device] = self._backend.new_pool(x.device)

        def forward(inp, capturing):
            if not capturing:
                return model(inp)
            verify, fold._verify = fold._verify, False  # host-side comparisons cannot be captured
            try:
                return model(inp)
            finally:
                fold._verify = verify

        # the same capture whatever the caller's mode (under inference_mode too: its tensors
        # could not be written by a later call outside it)
        with torch.inference_mode(False), torch.no_grad():
            out, replay, handle = self._backend.capture(forward, static, warmup=self.warmup, pool=pool)
        held = _held_by_units(model.modules())
        self._backend.record_use(_tensors_in(held))
        g = _Graph(static, out, replay, handle, held)
        if self._snap is not None and not self._snap.unchanged():
            # the capture itself changed the model (a lazy module, say): the others are stale
            self._drop(self._snap.describe_change())
        self._snap = _Snapshot(model)
        if self._snap.signature[3] or self._snap.signature[0][4]:
            backends.say_once("resnet_fast: the model captured into CUDA graphs has module hooks: "
                              "they ran while capturing and do not run on replays")
        self._graphs[key] = g
        self.captures += 1
        return g


def _feed(g: _Graph, x: torch.Tensor) -> None:
    if x is not g.static_input:
        g.static_input.copy_(x.detach() if x.requires_grad else x)


def _refuse_training(model: nn.Module) -> None:
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
        raise RuntimeError(f"CudaGraphRunner captures the eval() forward, but {shown} "
                           f"{'is' if len(training) == 1 else 'are'} in train() mode: call "
                           f"model.eval() first (capturing training steps is a different feature)")


def capture(model: nn.Module, *examples: torch.Tensor, **kwargs: Any) -> CudaGraphRunner:
    """A :class:`CudaGraphRunner` for ``model`` (keyword arguments as there), with a graph
    captured now for each example input's signature (so the first real call only replays)."""
    runner = CudaGraphRunner(model, **kwargs)
    for x in examples:
        runner.static_input(x)
    return runner
