"""What fuses: the one module that decides, for every converter.

* What a fused unit accepts (:func:`conv_refusal`, :func:`norm_kind`, :func:`has_hooks`): the
  rules both converters apply to a conv and to the norm next to it.
* torchvision's blocks (:func:`why_not_torchvision_block`): the fast path of
  :mod:`resnet_fast.convert`, which knows their structure and needs no tracing.
* The patterns the graph-level converter fuses in the torch.fx graph of one module
  (:func:`find_units`), described below.

A *unit* is what one fused op computes (the contract of :func:`resnet_fast.ops.conv_bn_act`):

    [relu(bn_pre(z)) →] conv(+bias) [→ BN] [→ + residual] [→ ReLU]

with ReLU written as ``nn.ReLU``, ``F.relu``, ``torch.relu`` or in place (``inplace=True``,
``relu_``), the add as ``+``, ``+=``, ``torch.add``, ``operator.iadd`` or ``.add(_)``, a
BatchNorm that tracks running statistics (timm's ``BatchNormAct2d`` counts as BN + ReLU, and
torchvision's ``FrozenBatchNorm2d`` as BN).

This module only reads modules and graphs and says what to fuse; rewriting a graph is
:mod:`resnet_fast.fx_fusion`'s job. The rules that keep a rewrite exact:

* A node joins a unit only when the value before it is read by that node alone: nothing else
  may see an intermediate the fused op never materialises. That is also what makes in-place
  ReLUs and adds safe to fuse: the tensor they overwrite has no other reader.
* An in-place add fuses only its destination (``out += r`` fuses ``out``; ``r += out`` writes
  into ``r``, which may be the block's input, so it stays).
* The fused op reads its inputs where the unit's last node was. A unit is refused when a node
  in between may write in place (an in-place op, or a module the trace does not see into).
* A BatchNorm after a conv folds into that conv (epilogue); only a BN that is not a conv's
  epilogue becomes a prologue of the convs it feeds (pre-activation). It does so only when its
  BN+ReLU output feeds nothing but convs: a tensor also needed elsewhere (a shortcut, say) is
  computed once anyway, and convs reading it is cheaper than each recomputing it.
* A conv with nothing to fuse stays an ``nn.Conv2d`` (cuDNN) unless it reads fewer than
  :data:`BARE_UNIT_MAX_CIN` channels: an image stem with no BN after it (pre-activation
  ResNets), which cuDNN's channels_last kernels run poorly and the fused kernels' narrow-input
  path does not. Its summary row still says nothing was fused.
* ``relu(a + b)`` that no unit takes is a :class:`Join`, one add_relu op, under the same
  rules (the sum read by the ReLU alone, an in-place add's destination read by nothing else).
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .plan import FusedUnit, unit_of

Node = fx.Node

#: a conv with nothing to fuse still becomes a unit (runs on the fused op) when it reads fewer
#: channels than this: an image stem (see the module doc)
BARE_UNIT_MAX_CIN = 8


# --------------------------------------------------------------------------------------
# What a fused unit accepts (one set of rules for every converter)
# --------------------------------------------------------------------------------------
def has_hooks(m: nn.Module) -> bool:
    """Whether calling m runs hooks: fusing it, or tracing through it, would skip them."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _loaded_type(module: str, name: str):
    # never import timm or torchvision for this: a model holding their layers already did
    mod = sys.modules.get(module)
    return getattr(mod, name, None)


def _bn_act_type():
    return _loaded_type("timm.layers", "BatchNormAct2d")


def special_leaf(m: nn.Module) -> bool:
    """Norm layers outside torch.nn that fused_conv folds (timm's BatchNormAct2d,
    torchvision's FrozenBatchNorm2d): converters keep them whole."""
    return type(m) in {_bn_act_type(), _loaded_type("torchvision.ops.misc", "FrozenBatchNorm2d")} - {None}


def conv_refusal(m: nn.Module) -> Optional[str]:
    """Why this conv cannot be fused_conv's conv, or None."""
    if type(m) is not nn.Conv2d:
        return f"{type(m).__name__} is not a plain nn.Conv2d (it has a forward of its own)"
    if has_hooks(m):
        return "it has hooks, which a fused op would skip"
    if isinstance(m.padding, str):
        return f"padding={m.padding!r} is not supported by the fused conv"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} is not supported by the fused conv"
    return None


def pool_refusal(m: Optional[nn.Module]) -> Optional[str]:
    """Why this module cannot run as the NHWC max-pool kernel (ops.max_pool2d), or None. Only
    ever asked at call time too: hooks and return_indices can be set after convert."""
    if m is None:
        return "no pool"
    if type(m) is not nn.MaxPool2d:
        return f"{type(m).__name__} is not a plain nn.MaxPool2d"
    if m.return_indices:
        return "it returns indices"
    if has_hooks(m):
        return "it has hooks, which the pool kernel would skip"
    return None


def norm_kind(m: nn.Module) -> tuple[Optional[bool], Optional[str]]:
    """What a module next to a conv is, as far as fused_conv's ``bn``/``pre_bn`` go:
    (applies_relu, None) for a BatchNorm it folds (applies_relu: timm's BatchNormAct2d with
    its ReLU, which the caller must then fuse too); (None, why) for a norm it cannot fold,
    ``why`` completing "a <Type>, which ..."; (None, None) for anything else."""
    relu = False
    if type(m) is _bn_act_type():
        if type(m.drop) is not nn.Identity or type(m.act) not in (nn.Identity, nn.ReLU) \
                or has_hooks(m.drop) or has_hooks(m.act):
            return None, (f"applies {type(m.act).__name__}/{type(m.drop).__name__}, "
                          "which the fused op cannot")
        relu = type(m.act) is nn.ReLU
    elif type(m) not in (nn.BatchNorm2d, nn.SyncBatchNorm) and not special_leaf(m):
        if "norm" in type(m).__name__.lower():
            return None, "cannot be folded into a conv"
        return None, None
    if has_hooks(m):
        return None, "has hooks, which a fused op would skip"
    if getattr(m, "running_mean", None) is None or getattr(m, "track_running_stats", True) is False:
        return None, "does not track running statistics, so it cannot be folded"
    return relu, None


def fusable_downsample(ds: Optional[nn.Module]):
    """(conv, bn) when ds is the usual Sequential(conv1x1, BatchNorm), else None."""
    if (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)
            and norm_kind(ds[1]) == (False, None)):
        return ds[0], ds[1]
    return None


# --------------------------------------------------------------------------------------
# torchvision's blocks (the fast path)
# --------------------------------------------------------------------------------------
def why_not_torchvision_block(block: nn.Module) -> Optional[str]:
    """Why the torchvision fast path cannot fuse this BasicBlock/Bottleneck, or None."""
    pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    if fusable_downsample(block.downsample) is not None:
        pairs.append(("downsample.0", "downsample.1"))
    for conv, bn in pairs:
        why = why_not_torchvision_pair(block, conv, bn) if hasattr(block, conv) else None
        if why:
            return why
    return None


def why_not_torchvision_pair(m: nn.Module, conv: str, bn: str) -> Optional[str]:
    """Why the fast path cannot fuse m's conv and BN (named as in m), or None: the rules of
    the fused unit, as for the graph-level converter; and a BN with an activation of its own
    does not fit torchvision's code."""
    why = conv_refusal(m.get_submodule(conv))
    if why:
        return f"{conv}: {why}"
    norm = m.get_submodule(bn)
    relu, why = norm_kind(norm)
    if relu is None or relu:
        return f"{bn} is a {type(norm).__name__}, which " + (why or "applies an activation of its own")
    return None


# --------------------------------------------------------------------------------------
# What a node is
# --------------------------------------------------------------------------------------
_RELU_FUNCTIONS = {F.relu: False, torch.relu: False, F.relu_: True, torch.relu_: True}
_RELU_METHODS = {"relu": False, "relu_": True}
_ADD_FUNCTIONS = {operator.add: False, torch.add: False, operator.iadd: True}
_ADD_METHODS = {"add": False, "add_": True}
_INPLACE_OPERATORS = {getattr(operator, f"i{n}") for n in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift",
    "rshift", "matmul")} | {operator.setitem}


def _module(node: Node, modules) -> Optional[nn.Module]:
    return modules.get(node.target) if node.op == "call_module" else None


def _one_input(node: Node) -> Optional[Node]:
    """The node's single tensor argument when it is called with exactly that."""
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], Node):
        return node.args[0]
    return None


def relu_input(node: Node, modules) -> Optional[Node]:
    """The input of a ReLU node (any of its spellings), or None."""
    m = _module(node, modules)
    if m is not None:
        return _one_input(node) if type(m) is nn.ReLU and not has_hooks(m) else None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        args, kwargs = node.args, dict(node.kwargs)
        if len(args) == 2 and node.target is F.relu:
            kwargs["inplace"] = args[1]
            args = args[:1]
        if len(args) == 1 and isinstance(args[0], Node) and set(kwargs) <= {"inplace"} \
                and isinstance(kwargs.get("inplace", False), bool):
            return args[0]
        return None
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return _one_input(node)
    return None


def add_operands(node: Node) -> Optional[tuple[Node, Node, bool]]:
    """(a, b, in_place) for a tensor + tensor node, or None. In place: a is overwritten."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        inplace = _ADD_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        inplace = _ADD_METHODS[node.target]
    else:
        return None
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, Node) for a in node.args):
        return None
    a, b = node.args
    return (a, b, inplace) if a is not b else None


def mutates(node: Node, modules) -> bool:
    """Whether the node may write into a tensor it did not create (conservative)."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
                or (name.endswith("_") and not name.startswith("_"))
                or (node.target is F.relu and len(node.args) > 1 and node.args[1] is True))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_module":
        m = modules[node.target]
        simple = (type(m).__module__.startswith("torch.nn.") and not any(True for _ in m.children())) \
            or special_leaf(m)
        # a module we cannot see into (a block, a container of blocks) might write its input
        return getattr(m, "inplace", False) is True if simple else True
    return False


@dataclass
class Norm:
    """A BatchNorm node that can be folded: the module, and whether it applies a ReLU itself."""
    node: Node
    module: nn.Module
    relu: bool

    @property
    def channels(self) -> int:
        return self.module.running_mean.shape[0]  # FrozenBatchNorm2d has no num_features


def foldable_norm(node: Node, modules) -> tuple[Optional[Norm], Optional[str]]:
    """(Norm, None) for a BatchNorm node that folds; (None, why) for a norm that does not;
    (None, None) for anything else."""
    m = _module(node, modules)
    if m is None or _one_input(node) is None:
        return None, None
    relu, why = norm_kind(m)
    if relu is None:
        return None, why and f"it is followed by a {type(m).__name__}, which {why}"
    return Norm(node, m, relu), None


# --------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------
@dataclass
class Prologue:
    """BN (+ ReLU) in front of convs: ``relu(bn(z))``; ``relu`` is None for BatchNormAct2d."""
    norm: Norm
    relu: Optional[Node]

    @property
    def z(self) -> Node:
        return self.norm.node.args[0]

    @property
    def nodes(self) -> list[Node]:
        return [self.norm.node] + ([self.relu] if self.relu is not None else [])


@dataclass
class Unit:
    """One conv and what fuses around it; ``nodes`` are replaced by one fused call."""
    conv: Node
    module: nn.Conv2d
    bn: Optional[Norm] = None
    relu: bool = False
    add: Optional[Node] = None      # the residual add, whose other operand is the residual
    pre: Optional[Prologue] = None
    nodes: list[Node] = field(default_factory=list)  # conv [, bn] [, add] [, relu], in order
    #: an nn.MaxPool2d call reading the unit's output alone (a stem's pool): it runs on the op
    #: contract's NHWC pool right after the unit
    pool: Optional[Node] = None

    @property
    def out(self) -> Node:
        return self.nodes[-1]

    @property
    def x(self) -> Node:
        """What the fused op reads: the conv's input, or the prologue BN's input."""
        return self.pre.z if self.pre is not None else self.conv.args[0]

    @property
    def residual(self) -> Optional[Node]:
        """The add's other operand (read live: rewriting an earlier unit may replace it)."""
        if self.add is None:
            return None
        a, b = self.add.args
        return b if a in self.nodes else a

    @property
    def fuses_anything(self) -> bool:
        return self.bn is not None or self.relu or self.add is not None or self.pre is not None

    @property
    def runs_fused(self) -> bool:
        """Whether the unit replaces its nodes: it fuses something, or it is a stem."""
        return self.fuses_anything or self.module.in_channels < BARE_UNIT_MAX_CIN

    def describe(self) -> FusedUnit:
        """The unit as the fusion plan records it (names of the traced module's submodules)."""
        return unit_of(self.conv.target, self.module, self.bn.node.target if self.bn else None,
                       relu=self.relu, residual=self.add is not None,
                       pre_bn=self.pre.norm.node.target if self.pre else None,
                       pool=self.pool.target if self.pool is not None else None)


@dataclass
class Join:
    """relu(a + b) that no conv's epilogue took: one add_relu op (the fused residual join)."""
    add: Node
    relu: Node


@dataclass
class GraphMatches:
    """What :func:`find_units` found in one graph."""
    units: list[Unit]
    #: residual joins left to the add_relu op, in graph order
    joins: list[Join]
    #: conv target -> (fused kinds, reason it is not fused or None), one per conv called
    rows: dict[str, tuple[tuple, Optional[str]]]
    #: conv target -> why a fusion it asks for is refused (reported by convert's warning)
    issues: dict[str, str]
    #: the graph adds two tensors: a residual block, converted as a unit of its own
    is_block: bool
    #: the graph calls convs, BNs or ReLUs directly (worth inlining into its parent's graph)
    has_candidates: bool


def _only_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _describe(node: Node, modules) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return "the module's output" if node.op == "output" else node.op


class _Graph:
    """Positions, conv depths and possible in-place writers of one graph."""

    def __init__(self, graph: fx.Graph, modules):
        self.modules = modules
        self.nodes = list(graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.writers = [n for n in self.nodes if mutates(n, modules)]
        # convs on the longest path to each node: a residual add's deeper operand is the
        # main path, the one torchvision (and everyone) fuses the add into
        self.depth: dict[Node, int] = {}
        for n in self.nodes:
            d = max((self.depth[a] for a in n.all_input_nodes), default=0)
            self.depth[n] = d + (isinstance(_module(n, modules), nn.Conv2d))

    def safe(self, first: Node, last: Node, own) -> bool:
        """No node strictly between first and last (other than ``own``) may write in place."""
        lo, hi = self.pos[first], self.pos[last]
        return not any(lo < self.pos[w] < hi and w not in own for w in self.writers)


def find_units(graph: fx.Graph, modules: dict[str, nn.Module]) -> GraphMatches:
    """The units to fuse in ``graph`` (a trace of the module whose named_modules() is
    ``modules``), and a row for every conv it calls. See the module doc for the rules."""
    g = _Graph(graph, modules)
    convs = [n for n in g.nodes if isinstance(_module(n, modules), nn.Conv2d)]
    units: dict[Node, Unit] = {}
    reasons: dict[Node, str] = {}
    issues: dict[str, str] = {}

    # epilogues: conv [→ BN] [→ ReLU]
    for c in convs:
        m = modules[c.target]
        why = conv_refusal(m) or (None if _one_input(c) is not None else "it is called with extra arguments")
        if why:
            reasons[c] = issues[c.target] = why
            continue
        u = units[c] = Unit(c, m, nodes=[c])
        nxt = _only_user(c)
        if nxt is not None:
            norm, why = foldable_norm(nxt, modules)
            if norm is not None and norm.channels == m.out_channels and g.safe(c, nxt, ()):
                u.bn, u.relu = norm, norm.relu
                u.nodes.append(nxt)
            elif why:
                issues[c.target] = why
        if not u.relu:
            _take_relu(u, g)

    # residuals: unit → + r [→ ReLU]
    for n in g.nodes:
        ops = add_operands(n)
        if ops is None:
            continue
        a, b, inplace = ops
        cands = [(u, other) for u, other in ((_unit_ending(units, a, n), b), (_unit_ending(units, b, n), a))
                 if u is not None and not u.relu and other not in u.nodes]
        if inplace:  # only the destination of an in-place add can take it
            cands = [(u, other) for u, other in cands if u.out is a]
        cands.sort(key=lambda c: (g.depth[c[0].conv], g.pos[c[0].out]), reverse=True)
        for u, other in cands:
            if g.safe(u.conv, n, u.nodes):
                u.add = n
                u.nodes.append(n)
                _take_relu(u, g)
                break

    # prologues: BN → ReLU → convs (only where the BN is no conv's epilogue)
    epilogue_bns = {u.bn.node for u in units.values() if u.bn is not None}
    for n in g.nodes:
        if n in epilogue_bns:
            continue
        norm, _ = foldable_norm(n, modules)
        if norm is None:
            continue
        relu = None
        if not norm.relu:
            relu = _only_user(n)
            if relu is None or relu_input(relu, modules) is not n:
                continue
        pre = Prologue(norm, relu)
        act = relu if relu is not None else n
        readers = list(act.users)
        takers = [units.get(r) for r in readers]
        ok = readers and all(u is not None and u.conv.args[0] is act and u.pre is None
                             and u.module.in_channels == norm.channels
                             and g.safe(n, u.out, u.nodes + pre.nodes) for u in takers)
        if ok:
            for u in takers:
                u.pre = pre
        else:
            for u in takers:
                if u is not None and u.conv.args[0] is act:
                    reasons.setdefault(u.conv, "its BN+ReLU input is also used elsewhere, so it is "
                                                "computed once and read")

    absorbed = {n for u in units.values() for n in u.nodes}
    joins = [j for j in (_join_at(n, g) for n in g.nodes if n not in absorbed) if j is not None]

    rows: dict[str, tuple[tuple, Optional[str]]] = {}
    fused = [u for u in units.values() if u.runs_fused]
    for u in fused:
        user = _only_user(u.out)
        if (user is not None and user.op == "call_module" and len(user.args) == 1 and not user.kwargs
                and pool_refusal(modules.get(user.target)) is None):
            u.pool = user
    for u in fused:
        if u.fuses_anything:
            rows.setdefault(u.conv.target, (u.describe().kinds, None))
    for c in convs:
        if c.target not in rows:
            rows[c.target] = ((), reasons.get(c) or issues.get(c.target) or _why_nothing(c, modules))
    return GraphMatches(
        units=sorted(fused, key=lambda u: g.pos[u.out]),
        joins=joins,
        rows=rows,
        issues={t: why for t, why in issues.items() if not rows[t][0]},
        is_block=any(add_operands(n) is not None for n in g.nodes),
        has_candidates=any(isinstance(_module(n, modules), nn.Conv2d)
                           or foldable_norm(n, modules)[0] is not None
                           or relu_input(n, modules) is not None for n in g.nodes),
    )


def _join_at(n: Node, g: _Graph) -> Optional[Join]:
    """A residual join ``relu(a + b)`` at add node n: the sum is read by the ReLU alone, an
    in-place add overwrites an ``a`` nothing else reads (the op writes a new tensor), and
    nothing between the add and the ReLU may write in place (the op reads a and b at the add)."""
    ops = add_operands(n)
    if ops is None:
        return None
    a, _, inplace = ops
    relu = _only_user(n)
    if relu is None or relu_input(relu, g.modules) is not n or (inplace and _only_user(a) is not n):
        return None
    return Join(n, relu) if g.safe(n, relu, ()) else None


def _unit_ending(units: dict[Node, Unit], node: Node, reader: Node) -> Optional[Unit]:
    """The unit whose output is ``node`` when ``reader`` is its only reader."""
    if _only_user(node) is not reader:
        return None
    for u in units.values():
        if u.out is node:
            return u
    return None


def _take_relu(u: Unit, g: _Graph) -> None:
    nxt = _only_user(u.out)
    if nxt is not None and relu_input(nxt, g.modules) is u.out and g.safe(u.conv, nxt, u.nodes):
        u.relu = True
        u.nodes.append(nxt)


def _why_nothing(c: Node, modules) -> str:
    users = list(c.users)
    if len(users) != 1:
        why = f"its output has {len(users)} readers, so nothing after it can be fused"
    else:
        why = f"nothing to fuse: its output goes to {_describe(users[0], modules)}"
    if modules[c.target].in_channels < BARE_UNIT_MAX_CIN and conv_refusal(modules[c.target]) is None:
        why += "; it runs on the fused op as a stem (see BARE_UNIT_MAX_CIN)"
    return why
