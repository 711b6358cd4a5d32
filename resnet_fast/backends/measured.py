"""``auto`` by measurement: where two kernel backends take a conv, the one measured faster for
that shape on this GPU runs it.

A fixed order cannot be right for every layer: on an H100 the Triton kernels win every 1x1, the
stem and stage 1's 3x3, the CUTLASS kernels stage 2-4's 3x3 (README's per-layer table). So the
first time ``auto`` meets a conv that more than one kernel backend takes on a CUDA device, it
times each of them once on random tensors of the call's shapes (CUDA events, the median of a few
launches after warm-up, which is also where Triton autotunes), keeps the faster, and remembers
it in this process and on disk (``choices.json`` in :func:`cache_dir`, keyed by GPU, library
versions and the call), so later processes on the same machine skip the measurement.

Never while torch.compile traces or a CUDA graph captures (the fixed order answers then: a
model is warmed up eagerly before either, which measures). ``RESNET_FAST_AUTO=order`` turns
measurement off.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch

log = logging.getLogger("resnet_fast")

ENV_VAR = "RESNET_FAST_AUTO"
CACHE_ENV_VAR = "RESNET_FAST_CACHE_DIR"
#: timed launches per backend (after WARMUP launches): a median of this many
REPEATS = 7
WARMUP = 2


class ConvCall(NamedTuple):
    """What decides a conv's speed: shapes (the weight as the conv holds it, unpacked), layout
    arguments, dtype and the epilogue/prologue it runs."""

    x_shape: tuple
    w_shape: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    dtype: torch.dtype
    residual: bool
    relu: bool
    pre: bool

    def key(self) -> str:
        return (f"x{list(self.x_shape)} w{list(self.w_shape)} s{list(self.stride)} p{list(self.padding)} "
                f"d{list(self.dilation)} g{self.groups} {str(self.dtype).replace('torch.', '')}"
                f"{' res' if self.residual else ''}{' relu' if self.relu else ''}{' pre' if self.pre else ''}")


def enabled() -> bool:
    mode = os.environ.get(ENV_VAR, "measure").lower()
    if mode not in ("measure", "order"):
        raise ValueError(f"{ENV_VAR}={mode!r}: choose 'measure' or 'order'")
    return mode == "measure"


def can_measure(x: torch.Tensor) -> bool:
    """Whether a call on x may be timed now: a CUDA tensor, outside compile tracing and stream
    capture."""
    return (x.device.type == "cuda" and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV_VAR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "resnet_fast")
    return Path(base)


_lock = threading.Lock()
_choices: dict[str, str] = {}       # machine+call key -> backend name, this process
_disk: Optional[dict] = None        # what choices.json held when first read
#: (backend, call, device) -> microseconds; replaced by tests (no GPU here)
timer: Optional[Callable] = None


_machines: dict = {}


def _machine(device: torch.device) -> str:
    """The GPU and the versions that decide the kernels' speed, as part of a choice's key."""
    found = _machines.get(device)
    if found is None:
        import triton

        from .. import __version__
        props = torch.cuda.get_device_properties(device)
        found = _machines[device] = (f"{props.name} sm_{props.major}{props.minor} torch {torch.__version__} "
                                     f"triton {getattr(triton, '__version__', '?')} resnet_fast {__version__}")
    return found


def _load_disk() -> dict:
    global _disk
    if _disk is None:
        try:
            _disk = json.loads((cache_dir() / "choices.json").read_text())
        except (OSError, ValueError):
            _disk = {}
    return _disk


def _save_disk(key: str, name: str, times: dict) -> None:
    path = cache_dir() / "choices.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_disk()
        data[key] = {"backend": name, "us": times}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: processes racing each write a whole file
    except OSError as e:  # a read-only home: the choice still holds for this process
        log.debug("resnet_fast: could not save the measured backend choice: %s", e)


def choose(candidates: Sequence, call: ConvCall, device: torch.device, machine: Optional[str] = None):
    """The candidate (Backend objects, in AUTO_ORDER) measured fastest for ``call``; measured
    once per machine and call, then remembered."""
    names = [c.name for c in candidates]
    machine = machine if machine is not None else _machine(device)
    key = f"{machine} | {' '.join(sorted(names))} | {call.key()}"
    with _lock:
        name = _choices.get(key)
        if name is None:
            hit = _load_disk().get(key)
            if hit is not None and hit.get("backend") in names:
                name = _choices[key] = hit["backend"]
    if name is None:
        times = {}
        for be in candidates:
            try:
                times[be.name] = (timer or time_call)(be, call, device)
            except Exception as e:  # noqa: BLE001 - a backend that fails here is not chosen
                log.warning("resnet_fast: auto could not time %r for %s: %s: %s", be.name, call.key(),
                            type(e).__name__, e)
        if not times:
            return candidates[0]
        name = min(times, key=lambda n: (times[n], names.index(n)))  # ties: the fixed order
        with _lock:
            _choices[key] = name
            _save_disk(key, name, {n: round(t, 2) for n, t in times.items()})
        log.info("resnet_fast: auto measured %s: %s -> %s", call.key(),
                 ", ".join(f"{n} {t:.1f} us" for n, t in times.items()), name)
    return candidates[names.index(name)]


def choices() -> dict[str, str]:
    """This process's measured choices (key -> backend name): for reports."""
    with _lock:
        return dict(_choices)


@torch.no_grad()
def time_call(be, call: ConvCall, device: torch.device) -> float:
    """Median microseconds of ``be`` running ``call`` on random tensors (CUDA events)."""
    from ..fold import pack_folded

    gen = torch.Generator(device=device).manual_seed(0)
    cl = torch.channels_last
    dt = call.dtype
    fan_in = call.w_shape[1] * call.w_shape[2] * call.w_shape[3]
    w = (torch.randn(call.w_shape, device=device, generator=gen) / fan_in ** 0.5).to(dt)
    w = pack_folded(be, w, call.groups, call.pre)
    x = torch.randn(call.x_shape, device=device, generator=gen).to(dt).contiguous(memory_format=cl)
    x = be.kernel_input(x, w.shape[1] * call.groups)
    cout = call.w_shape[0]
    bias = torch.randn(cout, device=device, generator=gen)
    from ..ops import conv_output_hw
    ho, wo = conv_output_hw(call.x_shape[2], call.x_shape[3], call.w_shape[2], call.w_shape[3],
                            call.stride, call.padding, call.dilation)
    res = (torch.randn((call.x_shape[0], cout, ho, wo), device=device, generator=gen).to(dt)
           .contiguous(memory_format=cl) if call.residual else None)
    cin = x.shape[1]
    pre_s = torch.rand(cin, device=device, generator=gen) + 0.5 if call.pre else None
    pre_b = torch.randn(cin, device=device, generator=gen) if call.pre else None

    def run():
        be.conv_bn_act(x, w, bias, list(call.stride), list(call.padding), list(call.dilation),
                       call.groups, res, call.relu, pre_s, pre_b)

    for _ in range(WARMUP):  # the first launch autotunes (Triton) or loads (CUTLASS)
        run()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)
