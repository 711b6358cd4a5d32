"""Launching a Triton kernel again without ``JITFunction.run``'s per-call work.

``kernel[grid](*args, **kwargs)`` binds every argument, derives the specialization key (dtype and
16-byte alignment of each pointer, ints equal to 1, None pointers), looks the binary up, builds
the launch metadata and only then calls the binary's launcher: 22-26 µs of Python per call on
triton 3.6 and 3.8, more than a small conv's kernel. A layer's launcher calls its kernel with the
same shapes every time (its launch record fixes them), so after the first launch this module
calls the ``CompiledKernel`` that run returned directly (~4 µs), with the call run itself makes
(triton/runtime/jit.py, JITFunction.run, the same in 3.6 and 3.8):

    kernel.run(gx, gy, gz, stream, kernel.function, kernel.packed_metadata, launch_metadata,
               launch_enter_hook, launch_exit_hook, *every_argument_constexprs_included)

It falls back to ``run`` for any call whose specialization could differ (a None pointer that is
a tensor now or the reverse, another dtype, a pointer no longer 16-byte aligned, another current
device, the debug or instrumentation knobs changed), and from the start for what it does not
model (an autotuner, heuristics, pre-run hooks, the interpreter, an older triton). A profiler
listening on the launch hooks (proton) gets the hooks and the metadata, as from run.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

try:
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - a triton without knobs (< 3.4): always through run
    knobs = None


def _live(hook) -> bool:
    # knobs.runtime.launch_*_hook is a HookChain in 3.6/3.8 (never None): live when it has calls
    return hook is not None and bool(getattr(hook, "calls", True))


def _state() -> tuple:
    """What run folds into the binary's options besides the arguments."""
    rt = knobs.runtime
    return rt.debug, knobs.compilation.instrumentation_mode, getattr(rt, "add_stages_inspection_hook", None)


def direct_launcher(fn, grid: tuple, args: tuple, kwargs: dict) -> Callable:
    """Launch ``fn[grid](*args, **kwargs)`` now, and return ``relaunch(*new_args)`` that launches
    the same binary with new positional arguments (tensors or None; ``kwargs`` and ``grid``
    stay as given), directly where it safely can (module doc), else through ``fn[grid]``."""
    slow = (lambda *a: fn[grid](*a, **kwargs))
    if knobs is None or not isinstance(fn, JITFunction) or fn.pre_run_hooks:
        slow(*args)
        return slow
    kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
    kernel = kernel.result() if hasattr(kernel, "result") else kernel  # 3.6: an async-compile future
    if kernel is None or not hasattr(kernel, "packed_metadata"):
        return slow
    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in fn.arg_names})
    bound.apply_defaults()
    values = tuple(bound.arguments.values())  # every parameter in signature order: what run passes
    tail = values[len(args):]
    g = (*grid, 1, 1)[:3]
    spec = [None if a is None else (a.dtype, a.data_ptr() % 16 == 0) for a in args]
    launcher, function, packed = kernel.run, kernel.function, kernel.packed_metadata  # .run loads it
    get_device, get_stream = driver.active.get_current_device, driver.active.get_current_stream
    device0, state0, rt = get_device(), _state(), knobs.runtime

    def relaunch(*a):
        if len(a) != len(spec) or _state() != state0:
            return slow(*a)
        for x, s in zip(a, spec):
            if (x is not None) if s is None else (x is None or x.dtype != s[0] or (s[1] and x.data_ptr() % 16)):
                return slow(*a)  # another specialization: run finds (or compiles) its binary
        device = get_device()
        if device != device0:
            return slow(*a)
        stream = get_stream(device)  # read every call: streams and CUDA-graph capture
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
        if _live(enter) or _live(leave):  # a profiler listens: what run would give it
            full = (*a, *tail)
            launcher(*g, stream, function, packed, kernel.launch_metadata(grid, stream, *full), enter, leave, *full)
        else:
            launcher(*g, stream, function, packed, None, None, None, *a, *tail)

    return relaunch



#: torch dtype -> the name Triton's signatures use, for the dtypes the kernels take
TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: the 8-bit float the fp8 conv reads and writes (resnet_fast.fp8); apart, so that the launchers
#: of 16/32-bit tensors keep refusing it
TRITON_FP8_DTYPES = {torch.float8_e4m3fn: "fp8e4nv"}


def compile_spec(fn, pointers: dict, scalars: dict, constexprs: dict, options: dict) -> dict:
    """``triton.compile``'s inputs for ``fn`` as the JIT would specialize a launch with these
    arguments (for ahead-of-time compiles, no GPU): pointers (name -> "*bf16" etc., None for an
    absent one) 16-byte aligned, ints marked divisible by 16 where they are, ints equal to 1
    and None pointers folded into constants. ``constexprs`` holds every other constexpr."""
    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if pointers.get(name) is not None:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in scalars and scalars[name] != 1:
            signature[name] = "i32"
            if scalars[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            if name in pointers:
                constexprs[name] = None
            elif name in scalars:
                constexprs[name] = 1
    return dict(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs, options=dict(options))
