"""The graph-level converter: any module whose forward torch.fx can trace gets its convs fused.

How a model is converted (:func:`convert_graphs`, called by :func:`resnet_fast.convert`):

1. Modules are visited children first. Each is traced with torch.fx (:func:`trace`): torch.nn
   layers, already converted modules and modules that do not trace stay calls; other children
   are traced through (*inlined*) when they are plain glue (no residual add of their own, e.g.
   a ``shortcut`` Sequential), so a pattern that crosses into them is seen whole.
2. :func:`resnet_fast.fusion_rules.find_units` finds the units to fuse in the graph.
3. A module whose graph has a residual add (a *block*), or the model itself, is converted in
   place when it has units (:func:`install`): its class becomes a subclass of its own class
   whose ``forward`` runs the rewritten graph, which calls :func:`fused_unit` (hence
   :func:`resnet_fast.modules.fused_conv`, the one fused unit) where the units were, and
   :func:`fused_join` (the add_relu op) where a residual join no unit took was. Every
   submodule, parameter and buffer stays where it was, under its name: ``state_dict``, hooks,
   ``isinstance`` and ``convert(model) is model`` all hold.
4. A module that does not trace is left as it is (its children are still converted); so is a
   graph-less glue module whose parent did not take it in, unless it has units of its own.

At run time the rewritten graph runs only in eval() with no autograd or autocast in play;
otherwise the module's original forward runs: torch's exact math, BatchNorm statistics and all.
"""

from __future__ import annotations

import copyreg
import functools
import importlib
import inspect
import linecache
import operator
import sys
import types
from typing import Callable, NamedTuple, Optional

import torch
from torch import fx, nn

from . import ops
from .fusion_rules import GraphMatches, find_units, has_hooks, special_leaf
from .modules import UnitState, fused_conv, fused_max_pool, like_input, reference_reason
from .plan import FusedUnit

#: the attribute of a converted module that holds its FusedGraph (not a submodule: no state_dict)
STATE_ATTR = "_resnet_fast_fx"


# --------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------
class Untraceable(Exception):
    """The module's forward cannot become one fixed graph; the message says why."""


class _Proxy(fx.Proxy):
    """fx's Proxy, plus in-place operators: plain fx records ``out += r`` as ``out + r``,
    which would lose the write into ``out`` that later readers of it may see."""


def _inplace_operator(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
              "ixor", "ilshift", "irshift", "imatmul"):
    setattr(_Proxy, f"__{_name}__", _inplace_operator(getattr(operator, _name)))


def _timm_notrace():
    fx_layers = sys.modules.get("timm.layers")
    if fx_layers is None:
        return (lambda m: False), ()
    return fx_layers.is_notrace_module, tuple(fx_layers.get_notrace_functions())


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set):
        self._is_notrace, notrace_functions = _timm_notrace()
        super().__init__(autowrap_functions=notrace_functions)
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (m in self._leaves or has_hooks(m) or special_leaf(m) or self._is_notrace(type(m))
                or super().is_leaf_module(m, qualname))

    def proxy(self, node):
        return _Proxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        # `nn.ReLU(inplace=True)(x)` built inside forward is not a submodule: trace through
        # such stateless modules (fx would give up on them)
        try:
            self.path_of_module(m)
        except NameError:
            if next(iter(m.parameters()), None) is None and next(iter(m.buffers()), None) is None:
                return forward(*args, **kwargs)
            raise
        return super().call_module(m, forward, args, kwargs)


class Traced(NamedTuple):
    graph: fx.Graph
    #: (position, name, default) of the forward's arguments the graph is specialised to
    specialized: tuple


def trace(module: nn.Module, leaves: set) -> Traced:
    """The eval() graph of ``module.forward``, keeping ``leaves`` (modules) as calls.

    Arguments with a default that is None, a bool, a number or a string (``pre_logits=False``,
    ``mask=None``) are traced at that default: a flag would otherwise stop the trace, and fx
    would take ``mask is not None`` as true. The converted forward runs the graph only for
    calls that leave them at their default (:meth:`FusedGraph.__call__`).
    Traced in train() and in eval(); different graphs mean the forward branches on
    ``self.training``, which one fixed graph would freeze: :class:`Untraceable`.
    """
    specialized = _specializable(type(module).forward)
    modes = [(m, m.training) for m in module.modules()]
    codes = []
    try:
        for training in (True, False):  # eval last: that graph is the one kept
            for m, _ in modes:
                m.training = training  # not .train(): user overrides of it may do more
            graph = _Tracer(leaves).trace(module, {n: d for _, n, d in specialized} or None)
            codes.append(graph.python_code("self").src)
    except Exception as e:  # fx raises many kinds; all mean the same here
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise Untraceable(f"its forward could not be traced ({type(e).__name__}: {first})") from e
    finally:
        for m, training in modes:
            m.training = training
    if codes[0] != codes[1]:
        raise Untraceable("its forward depends on self.training, which one traced graph would freeze")
    _drop_specialized(graph, specialized)
    _drop_identities(graph, dict(module.named_modules()))
    return Traced(graph, specialized)


_SPECIALIZABLE = (bool, int, float, str, type(None))


def _specializable(forward) -> tuple:
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]  # after self
    except (TypeError, ValueError):
        return ()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return ()
    return tuple((i, p.name, p.default) for i, p in enumerate(params)
                 if p.default is not p.empty and type(p.default) in _SPECIALIZABLE)


_SPEC_ASSERTS = (operator.eq, torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None))


def _drop_specialized(graph: fx.Graph, specialized: tuple) -> None:
    """Remove fx's asserts on specialised arguments and their placeholders: the converted
    forward checks those arguments before it runs the graph, and does not pass them."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for i, name, _ in specialized:
        doomed, todo = [], [placeholders[i]]
        while todo:
            n = todo.pop()
            if n is not placeholders[i] and n.target not in _SPEC_ASSERTS:
                raise Untraceable(f"its forward uses argument {name!r} in a way fx cannot fix")
            doomed.append(n)
            todo += list(n.users)
        for n in sorted(set(doomed), key=lambda n: -_index(graph, n)):
            graph.erase_node(n)


def _index(graph: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    raise KeyError(node)


def _drop_identities(graph: fx.Graph, modules) -> None:
    """nn.Identity calls (timm's disabled drop_block, aa, ...) read as their input."""
    for n in list(graph.nodes):
        m = modules.get(n.target) if n.op == "call_module" else None
        if type(m) is nn.Identity and not has_hooks(m) and len(n.args) == 1 and not n.kwargs:
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)


# --------------------------------------------------------------------------------------
# The rewritten graph and what it calls
# --------------------------------------------------------------------------------------
def fused_unit(state: "FusedGraph", key: str, *, x, residual, conv, bn, pre_bn, relu: bool, like,
               shared=None):
    """One unit of a rewritten graph: act(bn(conv(pre(x))) [+ residual]) via fused_conv.

    ``like``: the graph's input when the result leaves the fused ops (goes to any other
    op): it gets that input's memory format back, as the original conv's output would have.
    ``shared``: the forward's dict of pre-activations already computed (a pre-activation BN
    read by two convs, a projection shortcut and the main path, updates its running
    statistics once per forward, as the original does).
    """
    unit_state = state.unit_states[key]
    if residual is not None and not _fits(x, residual, conv):
        # a residual that broadcasts or has another dtype: the add stays outside the op
        y = fused_conv(x, conv, bn, unit_state, relu=False, pre_bn=pre_bn, backend=state.backend,
                       shared=shared) + residual
        y = torch.relu(y) if relu else y
    else:
        y = fused_conv(x, conv, bn, unit_state, relu=relu, residual=residual, pre_bn=pre_bn,
                       backend=state.backend, shared=shared)
    return like_input(y, like) if isinstance(like, torch.Tensor) else y


def fused_pool(state: "FusedGraph", *, x, pool, like):
    """The max-pool after a unit (a stem's) in a rewritten graph: modules.fused_max_pool, the
    op contract's values-only NHWC pool where it applies; ``like`` as in fused_unit."""
    y = fused_max_pool(pool, x, state.backend)
    return like_input(y, like) if isinstance(like, torch.Tensor) else y


def fused_join(state: "FusedGraph", *, a, b):
    """relu(a + b) of a rewritten graph, a residual join no conv epilogue took: the add_relu op
    for operands it takes (one shape, dtype, device and memory order), else torch's own."""
    if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.dtype in ops.FLOAT_DTYPES and a.device == b.device
            and ops.same_memory_order(a, b)):
        return ops.add_relu(a, b, backend=state.backend)
    return torch.relu(a + b)


def _fits(x: torch.Tensor, residual, conv: nn.Conv2d) -> bool:
    if not isinstance(residual, torch.Tensor) or x.dim() != 4:
        return False
    ho, wo = ops.conv_output_hw(x.shape[2], x.shape[3], *conv.kernel_size, conv.stride,
                                conv.padding, conv.dilation)
    return (tuple(residual.shape) == (x.shape[0], conv.out_channels, ho, wo)
            and residual.dtype == x.dtype and residual.device == x.device)


def rewrite(graph: fx.Graph, matches: GraphMatches) -> list[tuple[str, FusedUnit]]:
    """Replace each unit of ``matches`` in ``graph`` (in place) by one :func:`fused_unit` call.

    Returns (key, unit) per unit: its calls' key (the conv node's name: a conv called twice is
    two units), and the unit as the fusion plan records it."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    with graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(None):
        state = graph.get_attr(STATE_ATTR)
    shared = None
    if any(u.pre is not None for u in matches.units):
        with graph.inserting_after(state):
            shared = graph.call_function(dict, ())  # one per forward: see fused_unit
    first_input = placeholders[0] if placeholders else None

    units, calls, dead, pools = [], [], [], []
    for u in matches.units:
        key = u.conv.name
        with graph.inserting_before(u.out):
            nodes = (u.conv, u.bn.node if u.bn else None, u.pre.norm.node if u.pre else None)
            conv, bn, pre_bn = (graph.get_attr(n.target) if n is not None else None for n in nodes)
            call = graph.call_function(fused_unit, (state, key), dict(
                x=u.x, residual=u.residual, conv=conv, bn=bn, pre_bn=pre_bn, relu=u.relu, like=None,
                **({"shared": shared} if u.pre is not None else {})))
        u.out.replace_all_uses_with(call)
        for n in reversed(u.nodes):
            graph.erase_node(n)
        if u.pool is not None:
            with graph.inserting_before(u.pool):
                pool = graph.call_function(fused_pool, (state,), dict(
                    x=call, pool=graph.get_attr(u.pool.target), like=None))
            u.pool.replace_all_uses_with(pool)
            graph.erase_node(u.pool)
            pools.append(pool)
        if u.pre is not None:
            dead += [n for n in reversed(u.pre.nodes) if n not in dead]
        units.append((key, u.describe()))
        calls.append(call)
    for n in dead:  # prologue BN/ReLU nodes, read by nothing once all their convs are fused
        graph.erase_node(n)
    for j in matches.joins:  # after the units: an operand may be a unit's call by now
        a, b = j.add.args
        with graph.inserting_before(j.add):
            join = graph.call_function(fused_join, (state,), dict(a=a, b=b))
        j.relu.replace_all_uses_with(join)
        graph.erase_node(j.relu)
        graph.erase_node(j.add)
    # results read by anything but another fused op get the input's memory format back
    for call in calls + pools:
        if any(not (user.target is fused_pool and call is user.kwargs["x"])
               and (user.target is not fused_unit or call not in (user.kwargs["x"], user.kwargs["residual"]))
               for user in call.users):
            call.update_kwarg("like", first_input)
    graph.lint()
    return units


class FusedGraph:
    """The rewritten forward of one converted module, and the state of its fused units.

    Called by the module's forward with the module itself; the generated code reaches every
    submodule through it, by name, so nothing here goes stale when a submodule's tensors
    change (the fold caches check that) or the module is copied.
    """

    def __init__(self, graph: fx.Graph, specialized: tuple, units: list[tuple[str, FusedUnit]],
                 reasons: dict[str, str], owner: str, watched: tuple = ()):
        self.units = [u for _, u in units]  # what the graph fuses
        #: conv name -> why it is not fused (or runs bare), for every conv the graph calls
        self.reasons = reasons
        #: names of the submodules the original forward would call, or would reach, that the
        #: rewritten one runs without calling (fused, or traced through): hooks registered on
        #: any of them, now or later, send calls to the original forward
        self.watched = watched
        self.specialized = specialized  # see trace()
        self.unit_states = {key: UnitState() for key, _ in units}
        self.backend: Optional[str] = None
        code = graph.python_code("self")
        self.code = code.src
        self._globals = code.globals
        self._owner = owner
        self._compile()

    def _compile(self):
        # a file name of its own so tracebacks (and inspect) show the generated source
        filename = f"<resnet_fast fused forward of {self._owner} {hash(self.code) & 0xffffffff:08x}>"
        linecache.cache[filename] = (len(self.code), None, self.code.splitlines(True), filename)
        namespace = dict(self._globals)
        exec(compile(self.code, filename, "exec"), namespace)
        self._forward = namespace["forward"]

    def __call__(self, module: nn.Module, *args, **kwargs):
        mods = [_submodule(module, name) for name in self.watched]
        # the original forward: for calls the graph was not traced for, for hooks registered
        # on a module it skips (the fused ops would skip them), and for exact math
        if not self._at_defaults(args, kwargs) \
                or reference_reason(list(args) + list(kwargs.values()), mods, self.backend) is not None:
            return type(module)._resnet_fast_base.forward(module, *args, **kwargs)
        if self.specialized:  # the graph has no parameters for them
            skip = {i for i, _, _ in self.specialized}
            args = tuple(a for i, a in enumerate(args) if i not in skip)
            kwargs = {k: v for k, v in kwargs.items() if k not in {n for _, n, _ in self.specialized}}
        return self._forward(module, *args, **kwargs)

    def _at_defaults(self, args, kwargs) -> bool:
        for i, name, default in self.specialized:
            v = args[i] if i < len(args) else kwargs.get(name, default)
            if v is not default and not (type(v) is type(default) and v == default):
                return False
        return True

    # the generated function is rebuilt from its source; modules in its globals by name
    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_forward"]
        state["_globals"] = {k: ("module", v.__name__) if isinstance(v, types.ModuleType) else ("value", v)
                             for k, v in self._globals.items()}
        return state

    def __setstate__(self, state):
        state["_globals"] = {k: importlib.import_module(v) if kind == "module" else v
                             for k, (kind, v) in state["_globals"].items()}
        self.__dict__.update(state)
        self._compile()


def _submodule(module: nn.Module, name: str) -> nn.Module:
    # through _modules: module __getattr__ costs ~1 us a name, and this runs on every call
    for part in name.split("."):
        module = module._modules[part]
    return module


def _watched(module: nn.Module, graph: fx.Graph, units) -> tuple:
    """The submodules of ``module`` that the rewritten ``graph`` does not call, nor reach
    through a module it calls (see FusedGraph.watched), and every unit's modules."""
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    names = [name for _, u in units for name in u.modules()]
    for name, _ in module.named_modules():
        if name and not any(name == c or name.startswith(c + ".") for c in called):
            names.append(name)
    return tuple(dict.fromkeys(names))


# --------------------------------------------------------------------------------------
# Installing: the module becomes an instance of a subclass of its own class
# --------------------------------------------------------------------------------------
_FUSED_CLASSES: dict[type, type] = {}


def fused_class(base: type) -> type:
    """``Fused<Base>``: ``base`` with the fused forward (one class per base, made once)."""
    cls = _FUSED_CLASSES.get(base)
    if cls is None:
        def forward(self, *args, **kwargs):
            return getattr(self, STATE_ATTR)(self, *args, **kwargs)
        # base's name, doc and signature (inspect, torch.export and IDEs read them)
        functools.update_wrapper(forward, base.forward, updated=())
        cls = type(f"Fused{base.__name__}", (base,), {
            "__module__": base.__module__,
            "__doc__": base.__doc__,
            "_resnet_fast_base": base,
            "forward": forward,
            "fused_units": _fused_units,
            "fusion_reasons": _fusion_reasons,
            "__reduce_ex__": _reduce_ex,
        })
        cls.__qualname__ = f"Fused{base.__qualname__}"
        _FUSED_CLASSES[base] = cls
    return cls


def _fused_units(self) -> list[FusedUnit]:
    """The units the rewritten forward runs (see resnet_fast.plan)."""
    return list(getattr(self, STATE_ATTR).units)


def _fusion_reasons(self) -> dict[str, str]:
    """Conv name -> why the rewritten forward does not fuse it (or runs it bare)."""
    return dict(getattr(self, STATE_ATTR).reasons)


def _reduce_ex(self, protocol):
    # the class is made at run time, so pickle cannot find it by name: rebuild it from the
    # base class (which pickle can find) instead; the state is the module's as usual
    rv = object.__reduce_ex__(self, max(protocol, 2))
    if rv[0] is copyreg.__newobj__ and rv[1][0] is type(self):
        rv = (_new_fused, (type(self)._resnet_fast_base,) + tuple(rv[1][1:])) + tuple(rv[2:])
    return rv


def _new_fused(base: type, *args):
    cls = fused_class(base)
    return cls.__new__(cls, *args)


def fused_graph_of(m: nn.Module) -> Optional[FusedGraph]:
    return m.__dict__.get(STATE_ATTR)


def install(module: nn.Module, traced: Traced, matches: GraphMatches, owner: str) -> FusedGraph:
    """Rewrite the traced graph per ``matches`` and make it ``module``'s forward, in place."""
    units = rewrite(traced.graph, matches)
    reasons = {conv: why for conv, (_, why) in matches.rows.items() if why}
    fg = FusedGraph(traced.graph, traced.specialized, units, reasons, owner,
                    _watched(module, traced.graph, units))
    module.__dict__[STATE_ATTR] = fg
    module.__class__ = fused_class(type(module))
    return fg


# --------------------------------------------------------------------------------------
# The walk over a model
# --------------------------------------------------------------------------------------
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


_TORCH_RULE = fx.Tracer()  # fx's own notion of a library layer (torch.nn, not Sequential)


def _library_leaf(m: nn.Module) -> bool:
    """torch.nn layers, and the norm layers this package folds: never traced into."""
    is_notrace, _ = _timm_notrace()
    return _TORCH_RULE.is_leaf_module(m, "") or special_leaf(m) or is_notrace(type(m))


def convert_graphs(root: nn.Module, leave: Callable[[nn.Module], Optional[str]],
                   notes: dict[str, str], problems: dict[str, str]) -> None:
    """Convert every module of ``root`` that the graph-level converter can, in place.

    ``leave(m)``: "subtree" to leave m and all below it alone (modules already fused),
    "self" to convert only below it, None to convert normally.
    ``notes`` gets why each conv of a module left as is stays unfused (for fusion_summary);
    ``problems`` gets what convert's warning names: modules that do not trace, and convs whose
    fusion is refused. Both are keyed by qualified name ("" is ``root``).
    """
    glue: dict[nn.Module, tuple[str, Traced, GraphMatches]] = {}  # traced, waiting for the parent
    opaque: set = set()  # modules every trace keeps as calls

    def qual(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def take(name: str, m: nn.Module, traced: Traced, matches: GraphMatches) -> None:
        for conv, why in matches.issues.items():
            problems[qual(name, conv)] = why
        if matches.units or matches.joins:
            install(m, traced, matches, name or type(m).__name__)
        else:
            for conv, (_, why) in matches.rows.items():
                notes[qual(name, conv)] = why

    def settle(children) -> None:
        # glue whose parent does not take it in is converted on its own
        for c in children:
            name, traced, matches = glue.pop(c)
            take(name, c, traced, matches)
            opaque.add(c)

    def visit(m: nn.Module, name: str, is_root: bool) -> bool:
        """Convert below and at m; True when m is glue its parent should trace through."""
        how = leave(m)
        if how == "subtree" or fused_graph_of(m) is not None:
            return False
        if _library_leaf(m):
            if not isinstance(m, _CONTAINERS):
                return False
            how = "self"  # a ModuleList has no forward, but its children are modules like any
        inline = []
        for cname, c in m.named_children():
            if visit(c, qual(name, cname), False) and not has_hooks(c):
                inline.append(c)
            else:
                opaque.add(c)
                if c in glue:  # glue with hooks: tracing through it would skip them
                    settle([c])
        if how == "self":
            settle(inline)
            return False
        try:
            traced = trace(m, opaque)
        except Untraceable as e:
            problems[name] = notes[name] = str(e)
            settle(inline)
            return False
        matches = find_units(traced.graph, dict(m.named_modules()))
        if not is_root and not matches.is_block and matches.has_candidates:
            glue[m] = (name, traced, matches)
            return True
        take(name, m, traced, matches)
        # the glue m traced through is part of m's graph now (and had no units of its own
        # when m has none: a unit inside glue is a unit of any graph that inlines it)
        for c in inline:
            glue.pop(c, None)
        return False

    visit(root, "", True)
