"""The settings of one report run, shared by every section (built by report.py from flags)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Config:
    model: str
    batch: int
    dtype: torch.dtype
    resolution: int
    device: torch.device
    layout: str                     # input layout of compile / resnet_fast variants
    backends: list[str]             # resnet_fast backends to measure (available ones)
    sections: list[str]
    only: set[str] | None           # --variants: run only these names (eager_cl always runs)
    skip: set[str]
    ref_dtype: torch.dtype          # dtype of the reference forward (fp32 on GPU, fp64 on CPU)
    seed: int = 0
    quick: bool = False
    # timing budgets (ms of measured calls per figure); report.py sets them from --quick
    # (sized so the default resnet50 / batch 256 run, max-autotune included, fits 9 minutes)
    layer_target_ms: float = 100.0
    e2e_target_ms: float = 1500.0
    block_target_ms: float = 300.0
    max_layer_reps: int = 100       # keeps the launch queue from filling when launch is hidden
    max_e2e_reps: int = 200
    warmup: int = 3
    skipped: dict = field(default_factory=dict)  # name -> why it did not run
    # --budget-s: wall-clock deadline (time.monotonic()) after which no new figure starts, so a
    # run on a lent machine ends with its JSON written instead of being killed mid-section
    deadline: float | None = None
    budget_s: float | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    def wants(self, name: str, *, cpu_default: bool = True) -> bool:
        """Whether a variant/peer runs: not skipped, in --variants when given, and (on the
        CPU path) either cheap enough by default or asked for explicitly."""
        if name in self.skip:
            self.skipped[name] = "skipped by --skip"
            return False
        if self.only is not None and name not in self.only and name != "eager_cl":
            self.skipped[name] = "not in --variants"
            return False
        if not self.on_gpu and not cpu_default and (self.only is None or name not in self.only):
            self.skipped[name] = "not run on the CPU path by default (slow); ask with --variants"
            return False
        return True

    def out_of_time(self, name: str, need_s: float = 0.0) -> bool:
        """True (and name recorded as skipped) once fewer than need_s seconds of the --budget-s
        time budget are left."""
        if self.deadline is None or time.monotonic() + need_s < self.deadline:
            return False
        self.skipped[name] = f"not started: the --budget-s {self.budget_s:g} s time budget was spent"
        return True
