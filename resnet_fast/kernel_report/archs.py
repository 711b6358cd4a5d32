"""The GPUs the report models: hardware limits (occupancy) and the roofline ceilings.

Limits are the CUDA programming guide's "technical specifications per compute capability" and
the A100/H100 whitepapers. The ceilings are what one can expect from these machines, not the
datasheet: H100 SXM figures were measured on this project's lent machine (a large dense bf16
matmul through cuBLAS: ~790 TFLOP/s; a 1 GiB device-to-device copy counting bytes read plus
written: ~3.0 TB/s); the A100 figures are a datasheet-scaled estimate (312 TFLOP/s bf16 dense and
2.0 TB/s on the datasheet, scaled by the ratios of achievable to datasheet figures commonly seen
on A100 SXM4 80GB: ~90% for matmul, ~80% for copies). Override with --peak-tflops and
--bandwidth-tbs, or pass a measured ``peaks`` dict to :func:`estimate_layer_us`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

KB = 1024


@dataclass(frozen=True)
class ArchSpec:
    name: str                    # "sm_90a": what the kernels are compiled for
    capability: int              # 90: triton's GPUTarget arch
    gpu: str                     # the GPU the SM count and ceilings describe
    sms: int
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256    # registers are allocated per warp in units of 256 (8 per thread)
    max_regs_per_thread: int = 255
    subpartitions: int = 4       # each SM's register file is split over 4 schedulers
    smem_per_sm: int = 228 * KB          # the largest carveout
    smem_per_block_max: int = 227 * KB   # opt-in maximum for one CTA (static + dynamic)
    smem_reserved_per_block: int = 1 * KB  # the driver's per-CTA reservation (sm_80 and later)
    smem_alloc_unit: int = 128
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    peak_tflops: float = 0.0     # dense bf16/fp16 tensor-core ceiling
    bandwidth_tbs: float = 0.0   # DRAM bytes (read + written) per second
    datasheet_tflops: float = 0.0
    peak_source: str = ""
    #: CUDA-core FMA rate as a share of the dense bf16 tensor-core rate (datasheets: A100 19.5 of
    #: 312, H100 SXM 67 of 989 TFLOP/s)
    fma_fraction: float = 19.5 / 312
    #: warp-level mma.sync (HMMA) as a share of the peak. 1 where it is the native path (sm_80).
    #: On Hopper the peak needs warpgroup MMA (wgmma/HGMMA); mma.sync is taken to reach ~60% of
    #: it -- an assumption (published microbenchmarks of H100/H800 put it near 2/3), not measured
    #: here. It matters only to rank HMMA kernels against HGMMA ones on sm_90a.
    mma_sync_fraction: float = 1.0

    def peak_for(self, dtype: torch.dtype, *, tf32: Optional[bool] = None,
                 tensor_core: Optional[str] = "native") -> float:
        """The compute ceiling in TFLOP/s for dtype and the MMA family a kernel runs.

        bf16/fp16: the full rate; fp32 through TF32: half of it (both GPUs); fp32 without TF32,
        or a kernel without tensor-core instructions (tensor_core=None): the CUDA-core FMA rate;
        HMMA on Hopper: ``mma_sync_fraction`` of the rate."""
        if tensor_core is None:
            return self.peak_tflops * self.fma_fraction
        scale = self.mma_sync_fraction if tensor_core in ("HMMA", "IMMA") else 1.0
        if dtype in (torch.float16, torch.bfloat16):
            return self.peak_tflops * scale
        if tf32 is None:
            tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
        if dtype == torch.float32:
            return self.peak_tflops * scale / 2 if tf32 else self.peak_tflops * self.fma_fraction
        return self.peak_tflops * self.fma_fraction / 2  # fp64 on CUDA cores

    def with_peaks(self, peak_tflops: Optional[float] = None, bandwidth_tbs: Optional[float] = None,
                   source: Optional[str] = None) -> "ArchSpec":
        changes = {}
        if peak_tflops:
            changes["peak_tflops"] = float(peak_tflops)
        if bandwidth_tbs:
            changes["bandwidth_tbs"] = float(bandwidth_tbs)
        if changes:
            changes["peak_source"] = source or "given on the command line"
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


ARCHS: dict[str, ArchSpec] = {
    "sm_80": ArchSpec(
        name="sm_80", capability=80, gpu="A100 SXM4", sms=108,
        smem_per_sm=164 * KB, smem_per_block_max=163 * KB,
        peak_tflops=280.0, bandwidth_tbs=1.6, datasheet_tflops=312.0,
        peak_source="datasheet-scaled estimate (312 TFLOP/s bf16 dense x ~0.9; 2.0 TB/s x ~0.8)"),
    "sm_90a": ArchSpec(
        name="sm_90a", capability=90, gpu="H100 SXM5", sms=132,
        smem_per_sm=228 * KB, smem_per_block_max=227 * KB,
        peak_tflops=790.0, bandwidth_tbs=3.0, datasheet_tflops=989.4,
        fma_fraction=67.0 / 989.4, mma_sync_fraction=0.6,
        peak_source="measured on an H100 SXM: dense bf16 matmul ~790 TFLOP/s, device copy ~3.0 TB/s"),
}
ALIASES = {"sm80": "sm_80", "80": "sm_80", "a100": "sm_80", "sm_90": "sm_90a", "sm90": "sm_90a",
           "sm90a": "sm_90a", "90": "sm_90a", "90a": "sm_90a", "h100": "sm_90a"}
DEFAULT_ARCHS = ("sm_80", "sm_90a")


def get_arch(name: str) -> ArchSpec:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; choose from {list(ARCHS)} (or {sorted(ALIASES)})")
    return ARCHS[key]


def arch_from_device(device) -> ArchSpec:
    """The spec of a real CUDA device: its SM count and limits from the driver, the ceilings of
    the closest known arch (override them with measured peaks)."""
    device = torch.device(device)
    props = torch.cuda.get_device_properties(device)
    base = ARCHS["sm_90a"] if props.major >= 9 else ARCHS["sm_80"]
    changes = dict(name=base.name if (props.major, props.minor) in ((9, 0), (8, 0)) else f"sm_{props.major}{props.minor}",
                   capability=props.major * 10 + props.minor, gpu=props.name, sms=props.multi_processor_count)
    for field, attr in (("regs_per_sm", "regs_per_multiprocessor"),
                        ("smem_per_sm", "shared_memory_per_multiprocessor"),
                        ("smem_per_block_max", "shared_memory_per_block_optin"),
                        ("max_threads_per_sm", "max_threads_per_multi_processor")):
        v = getattr(props, attr, None)
        if v:
            changes[field] = int(v)
    return dataclasses.replace(base, **changes)
