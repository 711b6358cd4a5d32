"""Compiling the CUDA backend's conv translation units to cubins, without a GPU, and naming
every CUTLASS kernel in them.

For each arch, every ``conv_*.cu`` source the backend builds (cuda_backend.COMMON_SOURCES, plus
SM90_SOURCES for sm_90a) is compiled with ``nvcc -cubin`` and the backend's own nvcc flags
(cuda_backend.build_flags). Each kernel function found in a cubin is one CUTLASS instantiation
(tile config x dtype). What the cubin does not hold -- the dynamic shared memory CUTLASS asks for
at launch (sizeof(SharedStorage)), the threads per CTA, the tile shape and stage count -- comes
from a small host "probe" program compiled against the same headers, which instantiates exactly
the kernel types named in the cubin (their demangled names) and prints those constants.
Results are cached by a hash of the sources, flags and nvcc version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Optional

from . import cubin as cubin_tools


class CudaUnavailable(RuntimeError):
    """Why there are no CUDA rows (toolchain missing, sources absent, compile failed)."""


def default_cache_dir() -> Path:
    root = os.environ.get("RESNET_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "resnet_fast")
    return Path(root) / "kernel_report"


def _backend():
    from ..backends import cuda_backend
    return cuda_backend


def conv_units(arch: str) -> tuple[list[Path], list[str]]:
    """(conv translation units, nvcc flags) the backend builds for arch."""
    cb = _backend()
    with_sm90 = arch == "sm_90a"
    names = list(cb.COMMON_SOURCES) + (list(cb.SM90_SOURCES) if with_sm90 else [])
    units = [cb.CSRC / n for n in names if re.match(r"conv_.*\.cu$", n)]
    missing = [str(u) for u in units if not u.exists()]
    if not units:
        raise CudaUnavailable(f"the cuda backend lists no conv_*.cu sources for {arch} ({names})")
    if missing:
        raise CudaUnavailable(f"conv sources missing: {missing}")
    _, nvcc_flags = cb.build_flags(arch, with_sm90)
    return units, list(nvcc_flags)


def _nvcc_version(nvcc: str) -> str:
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except Exception:
        return "unknown"


_PTXAS_NOTE_RE = re.compile(r"ptxas (?:info|warning)\s*:\s*(\(C\d+\))?\s*(.*?)\s+in (?:the )?function\s+'(\S+?)'")


def parse_ptxas_notes(log: str) -> dict[str, list[str]]:
    """ptxas performance notes per (mangled) function, e.g. C7510 wgmma serialization."""
    out: dict[str, list[str]] = {}
    for code, msg, fn in _PTXAS_NOTE_RE.findall(log):
        note = f"{code.strip('()')} {msg}".strip() if code else msg
        if note not in out.setdefault(fn, []):
            out[fn].append(note)
    return out


def _config_names(source: str) -> list[str]:
    m = re.search(r"kConfigNames\s*\[[^\]]*\]\s*=\s*\{([^}]*)\}", source)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else []


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------
_PROBE_HELPERS = r'''
#include <cstdio>
#include <type_traits>
namespace rf_probe {
template <int I> struct rank : rank<I - 1> {};
template <> struct rank<0> {};
// dynamic shared memory the host launches with: CUTLASS 3 kernels' SharedStorageSize,
// CUTLASS 2.x kernels' sizeof(SharedStorage)
template <class K> auto smem(rank<1>) -> decltype(long(K::SharedStorageSize)) { return K::SharedStorageSize; }
template <class K> auto smem(rank<0>) -> decltype(long(sizeof(typename K::SharedStorage))) { return sizeof(typename K::SharedStorage); }
template <class K> auto threads(rank<2>) -> decltype(long(K::MaxThreadsPerBlock)) { return K::MaxThreadsPerBlock; }
template <class K> auto threads(rank<1>) -> decltype(long(K::kThreadCount)) { return K::kThreadCount; }
template <class K> long threads(rank<0>) { return -1; }
template <class K> auto stages(rank<2>) -> decltype(long(K::Mma::kStages)) { return K::Mma::kStages; }
template <class K> auto stages(rank<1>) -> decltype(long(K::DispatchPolicy::Stages)) { return K::DispatchPolicy::Stages; }
template <class K> long stages(rank<0>) { return -1; }
template <class K> auto tile(long* t, rank<2>) -> decltype(void(K::Mma::Shape::kM)) {
  t[0] = K::Mma::Shape::kM; t[1] = K::Mma::Shape::kN; t[2] = K::Mma::Shape::kK; }
template <class K> auto tile(long* t, rank<1>) -> decltype(void(cute::size<0>(typename K::TileShape{}))) {
  t[0] = cute::size<0>(typename K::TileShape{}); t[1] = cute::size<1>(typename K::TileShape{});
  t[2] = cute::size<2>(typename K::TileShape{}); }
template <class K> void tile(long* t, rank<0>) { t[0] = t[1] = t[2] = -1; }
template <class K> auto dtype(rank<1>) -> decltype(sizeof(typename K::ElementA), (const char*)nullptr) {
  using E = typename K::ElementA;
  return std::is_same<E, cutlass::bfloat16_t>::value ? "bf16" : std::is_same<E, cutlass::half_t>::value ? "fp16"
       : std::is_same<E, float>::value ? "fp32" : std::is_same<E, cutlass::tfloat32_t>::value ? "tf32" : "other"; }
template <class K> const char* dtype(rank<0>) { return "unknown"; }
template <class K> void report(int i) {
  long t[3];
  tile<K>(t, rank<2>{});
  std::printf("{\"index\": %d, \"smem_dynamic\": %ld, \"threads\": %ld, \"stages\": %ld, "
              "\"tile\": [%ld, %ld, %ld], \"dtype\": \"%s\"}\n", i, smem<K>(rank<1>{}),
              threads<K>(rank<2>{}), stages<K>(rank<2>{}), t[0], t[1], t[2], dtype<K>(rank<1>{}));
}
}  // namespace rf_probe
'''


def probe_source(unit_source: str, kernel_types: list[str]) -> str:
    includes = "\n".join(line for line in unit_source.splitlines() if line.strip().startswith("#include <"))
    calls = "\n".join(f"  rf_probe::report<{t}>({i});" for i, t in enumerate(kernel_types))
    return f"{includes}\n{_PROBE_HELPERS}\nint main() {{\n{calls}\n  return 0;\n}}\n"


def _regex_facts(demangled: str) -> dict:
    """Tile, stages and dtype read off a demangled CUTLASS kernel name (the probe's fallback)."""
    facts: dict = {}
    m = re.search(r"GemmShape<(\d+), (\d+), (\d+)>", demangled)
    if m:
        facts["tile"] = [int(x) for x in m.groups()]
    m3 = re.search(r"Sm90\w*>, cute::tuple<cute::C<(\d+)>, cute::C<(\d+)>, cute::tuple<cute::C<(\d+)> >", demangled)
    if m3:
        facts["tile"] = [int(x) for x in m3.groups()]
        s3 = re.search(r"ImplicitGemm<\([^)]*\)\d+, (\d+), ", demangled)
        if s3:
            facts["stages"] = int(s3.group(1))
    d = re.search(r"cutlass::(bfloat16_t|half_t)", demangled)
    if d:
        facts["dtype"] = {"bfloat16_t": "bf16", "half_t": "fp16"}[d.group(1)]
    return facts


# --------------------------------------------------------------------------------------------
# Compile + inspect
# --------------------------------------------------------------------------------------------
def _sh(cmd: list[str], log: Path, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    log.write_text("$ " + " ".join(cmd) + "\n" + p.stdout + p.stderr)
    return p


def compile_arch(arch: str, cache_dir: Optional[Path] = None, *, use_cache: bool = True) -> dict:
    """Compile and inspect every conv TU of the CUDA backend for arch.

    Returns {"arch", "units": [{"source", "cubin", "family", "seconds", "cached"}], "kernels":
    [{"function", "demangled", "family", "config", "dtype", "tile", "stages", "threads",
    "shared_dynamic", "registers", "spill_bytes", "shared_static", "sass", "ptxas_notes",
    "cubin"}], "notes": [...]}; raises CudaUnavailable with the reason when nothing can be built.
    """
    out = compile_archs([arch], cache_dir, use_cache=use_cache, jobs=1)[arch]
    if isinstance(out, Exception):
        raise out
    return out


def compile_archs(archs: list[str], cache_dir: Optional[Path] = None, *, use_cache: bool = True,
                  jobs: int = 2, on_unit_done=None) -> dict:
    """compile_arch for several arches, their translation units compiled concurrently (each nvcc
    is one process) by up to ``jobs`` threads. {arch: result dict or CudaUnavailable}."""
    import concurrent.futures as cf

    results: dict = {}
    tasks = []
    try:
        cb = _backend()
        tc = cb.check_toolchain()
    except Exception as e:
        err = CudaUnavailable(f"{type(e).__name__}: {e}")
        return {a: err for a in archs}
    nvcc_version = _nvcc_version(tc.nvcc)
    includes = [f"-I{cb.CSRC}"] + [f"-I{d}" for d in tc.include_dirs]
    cache_dir = Path(cache_dir or default_cache_dir()) / "cuda"
    for arch in archs:
        try:
            units, flags = conv_units(arch)
        except Exception as e:
            results[arch] = e if isinstance(e, CudaUnavailable) else CudaUnavailable(f"{type(e).__name__}: {e}")
            continue
        results[arch] = {"arch": arch, "units": [], "kernels": [], "notes": [], "nvcc": nvcc_version,
                         "flags": flags}
        tasks += [(arch, u, flags) for u in units]
    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        futs = {ex.submit(_compile_unit, arch, unit, flags, tc, includes, nvcc_version, cache_dir,
                          use_cache): (arch, unit) for arch, unit, flags in tasks}
        done = {}
        for f in cf.as_completed(futs):
            done[futs[f]] = f
            if on_unit_done:
                on_unit_done(*futs[f])
    for arch, unit, _ in tasks:  # assemble in source order
        res = results[arch]
        if isinstance(res, Exception):
            continue
        try:
            u = done[(arch, unit)].result()
        except Exception as e:
            results[arch] = e if isinstance(e, CudaUnavailable) else CudaUnavailable(f"{type(e).__name__}: {e}")
            continue
        res["units"].append(u["unit"])
        res["kernels"] += u["kernels"]
        res["notes"] += u["notes"]
    return results


def _compile_unit(arch, unit: Path, flags, tc, includes, nvcc_version, cache_dir: Path, use_cache) -> dict:
    import time

    cb = _backend()
    src_text = unit.read_text()
    h = hashlib.sha256()
    for part in [nvcc_version, " ".join(flags), " ".join(includes)]:
        h.update(part.encode())
    for f in sorted(cb.CSRC.glob("*")):  # the unit and every header it may include
        if f.suffix in (".cu", ".h", ".cuh", ".hpp"):
            h.update(f.name.encode() + f.read_bytes())
    work = cache_dir / f"{unit.stem}.{arch}.{h.hexdigest()[:16]}"
    work.mkdir(parents=True, exist_ok=True)
    cub = work / f"{unit.stem}.{arch}.cubin"
    tmp = f"{cub}.{os.getpid()}.{threading_id()}.tmp"  # concurrent reports must not share a temp file
    t0 = time.perf_counter()
    notes_out: list[str] = []
    cached = use_cache and cub.exists() and (work / "nvcc.log").exists()
    if not cached:
        p = _sh([tc.nvcc, *flags, "-cubin", *includes, str(unit), "-o", tmp], work / "nvcc.log.tmp")
        if p.returncode != 0:
            os.replace(work / "nvcc.log.tmp", work / "nvcc.failed.log")
            tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
            raise CudaUnavailable(f"nvcc failed on {unit.name} for {arch} (log: {work / 'nvcc.failed.log'}):\n{tail}")
        os.replace(tmp, cub)
        os.replace(work / "nvcc.log.tmp", work / "nvcc.log")
    family = re.sub(r"^conv_", "", unit.stem)
    ptxas_notes = parse_ptxas_notes((work / "nvcc.log").read_text())
    info = cubin_tools.inspect_cubin(cub)
    mangled = list(info)
    demangled = cubin_tools.demangle(mangled)
    types = [cubin_tools.template_argument(d) for d in demangled]

    probe: dict = {}
    probe_json = work / f"probe.{hashlib.sha256(_PROBE_HELPERS.encode()).hexdigest()[:12]}.json"
    if use_cache and probe_json.exists():
        probe = {int(k): v for k, v in json.loads(probe_json.read_text()).items()}
    elif all(types):
        tag = f"{os.getpid()}.{threading_id()}"
        (work / f"probe.{tag}.cu").write_text(probe_source(src_text, types))
        exe = work / f"probe.{tag}"
        p = _sh([tc.nvcc, *[f for f in flags if not f.startswith("-O")], "-O0", *includes,
                 str(work / f"probe.{tag}.cu"), "-o", str(exe)], work / "probe.log")
        if p.returncode == 0:
            r = subprocess.run([str(exe)], capture_output=True, text=True)
            if r.returncode == 0:
                for line in r.stdout.splitlines():
                    d = json.loads(line)
                    probe[d["index"]] = d
                probe_json.write_text(json.dumps(probe))
        for f in (exe, work / f"probe.{tag}.cu"):
            try:
                os.replace(f, work / f.name.replace(f".{tag}", ""))  # keep the last one to read
            except OSError:
                pass
        if not probe:
            notes_out.append(f"{unit.name}/{arch}: the shared-memory probe failed (see "
                             f"{work / 'probe.log'}); dynamic shared memory and threads unknown")
    names = _config_names(src_text)
    kernels = []
    for i, fn in enumerate(mangled):
        facts = _regex_facts(demangled[i])
        pr = probe.get(i, {})
        tile = pr.get("tile") if pr.get("tile", [-1])[0] > 0 else facts.get("tile")
        stages = pr.get("stages") if pr.get("stages", -1) > 0 else facts.get("stages")
        dtype = pr.get("dtype") if pr.get("dtype") not in (None, "unknown") else facts.get("dtype")
        kernels.append({
            "function": fn, "demangled": demangled[i], "family": family,
            "config": _match_config(names, family, tile, stages),
            "dtype": dtype, "tile": tile, "stages": stages,
            "threads": pr.get("threads") if pr.get("threads", -1) > 0 else None,
            "shared_dynamic": pr.get("smem_dynamic") if pr.get("smem_dynamic", -1) >= 0 else None,
            "ptxas_notes": ptxas_notes.get(fn, []), "cubin": str(cub), **{k: info[fn][k] for k in (
                "registers", "stack_bytes", "local_bytes", "spill_bytes", "shared_static", "sass")}})
    unit_info = {"source": str(unit), "cubin": str(cub), "family": family,
                 "seconds": round(time.perf_counter() - t0, 1), "cached": cached}
    return {"unit": unit_info, "kernels": kernels, "notes": notes_out}


def threading_id() -> int:
    import threading
    return threading.get_ident() % 100000


def _match_config(names: list[str], family: str, tile, stages) -> str:
    if tile:
        t = "x".join(str(x) for x in tile)
        hits = [n for n in names if t in n]
        if len(hits) > 1 and stages:
            hits = [n for n in hits if f"s{stages}" in n] or hits
        if len(hits) == 1:
            return hits[0]
        return f"{family}_{t}" + (f"_s{stages}" if stages else "")
    return f"{family}_?"
