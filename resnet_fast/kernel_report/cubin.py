"""Reading compiled cubins with NVIDIA's tools: resources per function (cuobjdump
--dump-resource-usage), the SASS per function (cuobjdump -sass), which tensor-core instruction
family the main loop runs, and C++ names (c++filt).

The tools come from triton's wheel (triton/backends/nvidia/bin) or the CUDA toolkit; nothing
here needs a GPU.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

#: SASS mnemonics of tensor-core MMA instructions, by family. *GMMA: Hopper warpgroup MMA (wgmma);
#: *MMA: warp-level mma.sync (Volta..Hopper).
WARPGROUP_MMA = ("HGMMA", "IGMMA", "QGMMA", "BGMMA")
WARP_MMA = ("HMMA", "IMMA", "DMMA", "BMMA")
MMA_FAMILIES = WARPGROUP_MMA + WARP_MMA


class ToolMissing(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def find_tool(name: str) -> str:
    """Path of cuobjdump / nvdisasm: $RESNET_FAST_CUDA_BIN, triton's bundled copy, the CUDA
    toolkit, then PATH."""
    cands = []
    if os.environ.get("RESNET_FAST_CUDA_BIN"):
        cands.append(Path(os.environ["RESNET_FAST_CUDA_BIN"]) / name)
    try:
        import triton
        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except Exception:  # pragma: no cover - triton is a dependency
        pass
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / "bin" / name)
    cands.append(Path("/usr/local/cuda/bin") / name)
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise ToolMissing(f"{name} not found (looked in {[str(c) for c in cands]} and PATH); it ships "
                      f"with triton's wheel (triton/backends/nvidia/bin) and the CUDA toolkit")


def _run(args: list[str]) -> str:
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])}... failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p.stdout


# --------------------------------------------------------------------------------------------
# Resource usage
# --------------------------------------------------------------------------------------------
_FUNC_RE = re.compile(r"^\s*Function\s+(\S+?)\s*:\s*$")
_FIELD_RE = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump --dump-resource-usage output -> {function: {"REG", "STACK", "SHARED", "LOCAL", ...}}."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNC_RE.match(line)
        if m:
            current = m.group(1)
            out[current] = {}
            continue
        if current is not None and "REG:" in line:
            out[current].update({k: int(v) for k, v in _FIELD_RE.findall(line)})
    return out


def resource_usage(cubin: str | os.PathLike) -> dict[str, dict[str, int]]:
    return parse_resource_usage(_run([find_tool("cuobjdump"), "--dump-resource-usage", str(cubin)]))


# --------------------------------------------------------------------------------------------
# SASS
# --------------------------------------------------------------------------------------------
_SASS_FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)([^;]*);")
_BRA_TARGET_RE = re.compile(r"\b0x([0-9a-f]+)\b")


@dataclass
class SassSummary:
    instructions: int = 0
    mma: dict[str, int] = field(default_factory=dict)        # full mnemonic -> count
    mma_in_loop: dict[str, int] = field(default_factory=dict)
    loops: list[tuple[int, int]] = field(default_factory=list)  # (start, end) byte offsets
    local_ops: int = 0                                       # LDL/STL: spill traffic in SASS
    tma_loads: int = 0                                       # UTMALDG (TMA)
    async_copies: int = 0                                    # LDGSTS (cp.async)

    @property
    def tensor_core(self) -> Optional[str]:
        """The MMA family the main loop runs (a loop's body holds it), else one seen anywhere."""
        for pool in (self.mma_in_loop, self.mma):
            fams = {k.split(".")[0] for k in pool}
            for fam in MMA_FAMILIES:  # warpgroup MMA first: a kernel with both is a wgmma kernel
                if fam in fams:
                    return fam
        return None

    @property
    def tensor_core_instruction(self) -> Optional[str]:
        fam = self.tensor_core
        if fam is None:
            return None
        pool = self.mma_in_loop or self.mma
        best = max((k for k in pool if k.split(".")[0] == fam), key=lambda k: pool[k], default=None)
        return best

    def as_dict(self) -> dict:
        return {"instructions": self.instructions, "mma": self.mma, "mma_in_loop": self.mma_in_loop,
                "loops": len(self.loops), "local_memory_ops": self.local_ops,
                "tma_loads": self.tma_loads, "async_copies": self.async_copies}


def parse_sass(text: str) -> dict[str, SassSummary]:
    """cuobjdump -sass output -> {function: SassSummary}. A loop is a backward branch; its body
    is the address range from the branch target to the branch (branches to themselves, the trap
    after EXIT, are not loops)."""
    funcs: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in text.splitlines():
        m = _SASS_FUNC_RE.match(line)
        if m:
            current = m.group(1)
            funcs[current] = []
            continue
        if current is None:
            continue
        m = _INSTR_RE.match(line)
        if m:
            funcs[current].append((int(m.group(1), 16), m.group(2), m.group(3)))
    out = {}
    for name, instrs in funcs.items():
        s = SassSummary(instructions=len(instrs))
        for addr, op, rest in instrs:
            if op.split(".")[0] in ("BRA", "JMP"):
                t = _BRA_TARGET_RE.search(rest)
                if t and int(t.group(1), 16) < addr:
                    s.loops.append((int(t.group(1), 16), addr))
        for addr, op, _ in instrs:
            base = op.split(".")[0]
            if base in MMA_FAMILIES:
                s.mma[op] = s.mma.get(op, 0) + 1
                if any(a <= addr <= b for a, b in s.loops):
                    s.mma_in_loop[op] = s.mma_in_loop.get(op, 0) + 1
            elif base in ("LDL", "STL"):
                s.local_ops += 1
            elif base == "UTMALDG":
                s.tma_loads += 1
            elif base == "LDGSTS":
                s.async_copies += 1
        out[name] = s
    return out


def sass(cubin: str | os.PathLike) -> dict[str, SassSummary]:
    return parse_sass(_run([find_tool("cuobjdump"), "-sass", str(cubin)]))


def inspect_cubin(cubin: str | os.PathLike) -> dict[str, dict]:
    """{function: {"registers", "stack_bytes", "local_bytes", "spill_bytes", "shared_static",
    "sass": SassSummary}} for every function of a cubin."""
    res = resource_usage(cubin)
    code = sass(cubin)
    out = {}
    for fn, r in res.items():
        stack, local = r.get("STACK", 0), r.get("LOCAL", 0)
        out[fn] = {"registers": r.get("REG", 0), "stack_bytes": stack, "local_bytes": local,
                   "spill_bytes": stack + local, "shared_static": r.get("SHARED", 0),
                   "sass": code.get(fn, SassSummary())}
    return out


# --------------------------------------------------------------------------------------------
# C++ names
# --------------------------------------------------------------------------------------------
def demangle(names: list[str]) -> list[str]:
    """Itanium-demangled names (c++filt; CUTLASS names need --no-recurse-limit), or the names
    unchanged where no demangler is installed."""
    tool = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if not tool or not names:
        return list(names)
    for flags in (["--no-recurse-limit"], []):
        p = subprocess.run([tool, *flags], input="\n".join(names) + "\n", capture_output=True, text=True)
        if p.returncode == 0:
            out = p.stdout.splitlines()
            if len(out) == len(names):
                return out
    return list(names)


def template_argument(demangled: str) -> Optional[str]:
    """The first template argument list of a demangled function name, e.g.
    ``void cutlass::Kernel<X>(X::Params)`` -> ``X``."""
    i = demangled.find("<")
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(demangled)):
        c = demangled[j]
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
            if depth == 0:
                return demangled[i + 1:j].strip()
    return None
