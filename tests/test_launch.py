"""kernels/launch.py's direct relaunch against JITFunction.run, with a fake driver that records
what reaches the binary's launcher (no GPU: the kernel compiles for sm_90 on the CPU). Run in a
fresh process: the suite's TRITON_INTERPRET=1 would make every kernel an interpreter object."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import torch, triton, triton.language as tl
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from resnet_fast.kernels.launch import direct_launcher

    CALLS = []

    class Launcher:  # where CudaLauncher stands: CompiledKernel._init_handles builds one
        def __init__(self, src, metadata):
            pass
        def __call__(self, *args):
            CALLS.append(args)

    class Utils:
        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}
        def load_binary(self, name, kernel, shared, device):
            return (1, 2, 32, 0, 1024)
        def unload_module(self, module):
            pass

    class Driver:
        launcher_cls = Launcher
        utils = Utils()
        def get_current_device(self): return 0
        def get_current_stream(self, device): return 1234
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cpu")
        def get_benchmarker(self): raise RuntimeError("no benchmarking here")

    driver.set_active(Driver())

    @triton.jit
    def k(a_ptr, b_ptr, out_ptr, n, SCALE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(a_ptr + offs, mask=offs < n)
        if b_ptr is not None:
            v += tl.load(b_ptr + offs, mask=offs < n)
        tl.store(out_ptr + offs, v * SCALE, mask=offs < n)

    def t(n=1000):
        return torch.empty(n, dtype=torch.float16)

    kw = dict(n=1000, SCALE=2, BLOCK=256, num_warps=4)
    grid = (4,)
    args = (t(), None, t())
    relaunch = direct_launcher(k, grid, args, kw)
    assert len(CALLS) == 1  # launched now, through run

    fresh = (t(), None, t())
    CALLS.clear(); k[grid](*fresh, **kw); ref = CALLS[-1]
    CALLS.clear(); relaunch(*fresh); got = CALLS[-1]
    assert len(ref) == len(got) and ref[:6] == got[:6], (ref[:6], got[:6])  # grid, stream, function, packed
    assert got[6:9] == (None, None, None)  # no hooks: no metadata built
    assert all(a is b for a, b in zip(ref[9:], got[9:]))  # the same argument objects, constexprs too

    seen = []
    hook = lambda md: seen.append(md.get()["name"])
    knobs.runtime.launch_enter_hook.add(hook)  # a profiler listening (proton does this)
    CALLS.clear(); relaunch(*fresh)
    assert CALLS[-1][7] is knobs.runtime.launch_enter_hook and CALLS[-1][6].get()["name"] == "k"
    knobs.runtime.launch_enter_hook.remove(hook)

    def binaries():
        return sum(len(c[0]) for c in k.device_caches.values())

    n0 = binaries()
    CALLS.clear(); relaunch(t(), t(), t())  # None -> tensor: another specialization
    assert binaries() == n0 + 1 and len(CALLS) == 1
    base = t(1016)
    CALLS.clear(); relaunch(base[1:1001], None, t())  # no longer 16-byte aligned
    assert binaries() == n0 + 2 and len(CALLS) == 1
    CALLS.clear(); relaunch(t().float(), None, t())  # another dtype
    assert binaries() == n0 + 3
    knobs.runtime.debug = True
    CALLS.clear(); relaunch(*fresh)
    assert binaries() == n0 + 4  # the knob is part of the options: run compiled again
    knobs.runtime.debug = False
    CALLS.clear(); relaunch(*fresh)
    assert CALLS[-1][6:9] == (None, None, None)  # direct again
    print("ok", triton.__version__)
''')


@pytest.mark.slow
def test_direct_relaunch_matches_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    script = tmp_path / "relaunch_check.py"  # @triton.jit reads its source from a file
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
