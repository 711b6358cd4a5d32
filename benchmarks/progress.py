"""Progress during long runs: one line per finished item, and a heartbeat while one call takes
minutes (torch.compile, max-autotune, a backend's first-call autotune) so a silent console
never looks like a hang. Lines go through tqdm.write when tqdm is installed (so they do not
tear a bar some library draws), plain flushed prints otherwise."""

from __future__ import annotations

import contextlib
import sys
import threading
import time

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # the GPU machine has tqdm, but nothing here needs it
    _tqdm = None


def log(msg: str) -> None:
    if _tqdm is not None:
        _tqdm.write(msg, file=sys.stdout)
    else:
        print(msg, flush=True)
    sys.stdout.flush()


@contextlib.contextmanager
def step(label: str, heartbeat_s: float = 20.0):
    """Print when a long step starts, every heartbeat_s while it runs, and its duration."""
    log(f"[{label}] ...")
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat():
        while not stop.wait(heartbeat_s):
            log(f"[{label}] still running, {time.perf_counter() - t0:.0f} s")

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=1)
        log(f"[{label}] done in {time.perf_counter() - t0:.1f} s")
