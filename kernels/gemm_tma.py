"""1x1 stride-1 convolution + folded BatchNorm (+ residual) (+ ReLU) as a persistent TMA GEMM.

    y = [relu]( x @ w^T + bias [+ residual] )

A 1x1, stride-1, unpadded conv over NHWC is a plain GEMM with nothing to gather:

    A = x        viewed as [M = N*H*W, Cin], row-major (NHWC memory order)
    B = weight   (Cout, Cin, 1, 1) in channels_last memory = [Cout, Cin], row-major (B^T, K-major)
    y            [M, Cout], row-major (NHWC again); the residual likewise

so every operand is a 2-D strided tensor that the Hopper tensor memory accelerator (TMA) can
copy tile by tile. The kernel follows Triton's persistent-matmul tutorial
(python/tutorials/09-persistent-matmul.py, ``matmul_kernel_descriptor_persistent``):

* device-side tensor descriptors (``tl.make_tensor_descriptor``) for A, B, the residual and y.
  Loads past the edge of a tensor (rows past M, channels past Cin or Cout) read zeros and
  stores past it are clipped by the hardware, so no masks: Cin and Cout need not be multiples
  of the block, only 16-byte aligned (TMA's rule for the base and every non-unit stride).
* a persistent grid: one program per SM, each looping over output tiles ``start_pid, start_pid
  + NUM_SMS, ...`` in the grouped order of the matmul tutorial (GROUP_M row tiles sweep all of
  Cout together, so their rows of A are reused from L2). The conv_bn_act kernel launches one
  program per tile, and a late ResNet-50 1x1 makes only 1.5-6 waves of them on 132 SMs, each
  program paying its prologue and draining its pipeline before its epilogue; here the tile loop
  is flattened with the K loop (``tl.range(..., flatten=True)``) into one software-pipelined
  loop, so the next tile's TMA loads are in flight during this tile's epilogue. (The tile count
  per SM is still ceil(tiles / 132): the autotuner's narrower tiles are for the layers where
  128x256 quantizes badly.) ``warp_specialize`` is left off: on sm_90a in triton 3.6 and 3.8 it
  compiles to the same software pipeline (no producer/consumer split); the tutorial says so too.
* the epilogue on the fp32 accumulator: + bias (fp32) [+ residual, read by TMA] [ReLU with NaN
  propagation], one cast, a TMA store; optionally in two halves of BLOCK_N/2 columns
  (EPILOGUE_SUBTILE, as the tutorial) so that the staging buffers in shared memory are half as
  large. The bias is added here, not as the accumulator's start as conv_bn_act does: a bias
  load at the top of each tile stops the flattened loop from being pipelined on sm_90a (the
  cubin then waits for every TMA load and every wgmma in turn).

Device-side descriptors are written by the kernel into a global-memory scratch buffer that the
launch allocates through ``triton.set_allocator``'s allocator (128 bytes per descriptor per
program). The launcher installs one (a torch allocation on the current device) only while it
launches, and only when the caller's context has none; see :func:`scratch_allocator`.

Where it applies: :func:`takes`. On GPUs before Hopper (sm_80) Triton rewrites the descriptors
into plain pointer loads (``rewrite_tensor_descriptor_to_pointer``), so the kernel compiles and
is correct there (the ahead-of-time spec compiles for sm_80: mma.sync, no spills), but it has
nothing over conv_bn_act's cp.async pipeline, so :func:`takes`, and with it the launcher,
refuses pre-Hopper devices.

Triton versions: written against 3.6 (the GPU machine) and 3.8 (here); the APIs used are the
same in both (make_tensor_descriptor, set_allocator's ContextVar, tl.range's flatten and
warp_specialize, the compiler's global-scratch sizing). The 3.6 interpreter cannot run this
(or conv_bn_act) with numpy 2: its tensors' __index__ is int() of a 1-element array.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time

import torch
import triton
import triton.language as tl

# absolute import: the kernel report loads this file again under a private name (see conv_bn_act)
from resnet_fast.kernels.conv_bn_act import input_precision
from resnet_fast.kernels.launch import TRITON_DTYPES as _TORCH_TO_TRITON, compile_spec

_log = logging.getLogger("resnet_fast")

#: kernels decorated while TRITON_INTERPRET=1 run in Triton's interpreter (CPU tensors too)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: environment variable naming one of gemm_configs() to use for every launch instead of autotuning
CONFIG_ENV_VAR = "RESNET_FAST_TRITON_GEMM_CONFIG"
#: TMA: base addresses and every stride but the last must be multiples of this many bytes
TMA_ALIGN = 16
#: the persistent grid's program count used by the ahead-of-time spec (H100 SXM and H200: 132 SMs)
DEFAULT_NUM_SMS = 132
#: programs of the persistent grid under the interpreter: fewer than the tests' tile counts, and
#: odd, so that each program walks several tiles and the strides cross group boundaries
INTERPRETER_NUM_SMS = 3

# tl.range's loop attributes: both are there in triton 3.6 and 3.8 (same signature in
# language/core.py); a release without one gets the plain loop instead (see the kernel).
_RANGE_PARAMS = inspect.signature(tl.range.__init__).parameters
HAS_FLATTEN = "flatten" in _RANGE_PARAMS
HAS_WARP_SPECIALIZE = "warp_specialize" in _RANGE_PARAMS


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
def _config(bm, bn, bk, warps, stages, subtile=True, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
                          "EPILOGUE_SUBTILE": subtile},
                         num_warps=warps, num_stages=stages)


def config_name(cfg: triton.Config) -> str:
    """``m128n256k64w8s3`` as conv_bn_act names its configs; ``f`` appended when the epilogue
    stores the full BLOCK_N at once (no subtiling)."""
    k = cfg.kwargs
    name = f"m{k['BLOCK_M']}n{k['BLOCK_N']}k{k['BLOCK_K']}w{cfg.num_warps}s{cfg.num_stages}"
    return name + ("" if k.get("EPILOGUE_SUBTILE", True) else "f")


def gemm_configs() -> dict[str, triton.Config]:
    """The autotuning candidates by name.

    For ResNet-50's stage 3-4 1x1s at batch 256 on H100/H200 (M = 50176 or 12544 rows, Cin and
    Cout 256..2048): 128-row tiles, one warpgroup per 64 rows (8 warps for BLOCK_N = 256),
    BLOCK_K = 64 (one 128-byte swizzle row of 16-bit channels). Shared memory per program is
    num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K * element size for the pipeline, plus the epilogue
    staging (the y tile, and the residual tile when there is one, each BLOCK_M x BLOCK_N/2 with
    the subtiled epilogue); every config here fits the 227 KB of an sm_90 program in 16 bits and
    runs one program per SM. The narrower tiles are for the layers whose 128x256 tiles make few
    waves (M = 12544, Cout = 512: 196 tiles on 132 SMs). The K = 32 candidates are fp32's (a
    32-channel fp32 row is 128 bytes, and no K = 64 candidate's stages fit in fp32);
    :func:`prune_configs` keeps each set for its dtypes.
    """
    cfgs = [
        _config(128, 256, 64, 8, 3),
        _config(128, 256, 64, 8, 4),  # 192 KB of stages: without a residual only
        _config(128, 128, 64, 8, 4),
        _config(128, 128, 64, 4, 4),
        _config(128, 128, 64, 4, 5),
        _config(128, 64, 64, 4, 6),
        _config(64, 128, 64, 4, 6),
        # fp32 (K = 32 channels is the same 128-byte row): the 16-bit candidates' stages do not
        # fit there; prune_configs keeps these for fp32 only
        _config(128, 128, 32, 8, 4),
        _config(128, 64, 32, 4, 4),
    ]
    return {config_name(c): c for c in cfgs}


#: the one config used under TRITON_INTERPRET=1: small tiles, so that the tests' small channel
#: counts and row counts still cross block edges (16 x 4 bytes: the fp32 descriptors' smallest
#: block rows are 16-byte multiples too)
INTERPRETER_CONFIG = _config(32, 16, 16, 4, 1, group_m=2)


def shared_memory_bytes(cfg: triton.Config, elem_size: int = 2, residual: bool = False) -> int:
    """Shared memory the config's buffers take: the pipeline's stages of A and B tiles, and the
    epilogue's y tile and residual tile (half width when subtiled). For 16-bit dtypes this is
    what Triton allocates on sm_90a less 24-40 bytes of barriers; for fp32 it is within about
    10 % (Triton adds layout-conversion scratch there, and shares the residual's buffer)."""
    k = cfg.kwargs
    stages = cfg.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elem_size
    part = k["BLOCK_M"] * (k["BLOCK_N"] // (2 if k.get("EPILOGUE_SUBTILE", True) else 1)) * elem_size
    return stages + part * (2 if residual else 1)


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
    # grouped order (matmul tutorial): GROUP_M row tiles, then the next column tile
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _epilogue_part(acc, bias_ptr, r_desc, y_desc, off_m, off_n, Cout,
                   HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, WIDTH: tl.constexpr):
    # fp32 throughout: bias, residual, ReLU (NaN-propagating, as torch.relu), then one cast.
    # The TMA store clips rows past M and columns past Cout.
    offs_n = off_n + tl.arange(0, WIDTH)
    bias = tl.load(bias_ptr + offs_n, mask=offs_n < Cout, other=0.0)
    acc = acc + bias[None, :]
    if HAS_RESIDUAL:
        acc += r_desc.load([off_m, off_n]).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


@triton.jit
def _tile(tile_id, tile_id_c, a_desc, b_desc, r_desc, y_desc, bias_ptr,
          num_pid_in_group, num_pid_m, k_tiles, Cout,
          HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          GROUP_M: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr):
    # One output tile. The main loop's coordinates come from tile_id, the epilogue's from its
    # own counter tile_id_c (same value): the tutorial's way of keeping the flattened loop's
    # prologue and epilogue from sharing a value across the software pipeline.
    pid_m, pid_n = _tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(k_tiles):
        off_k = ki * BLOCK_K
        a = a_desc.load([off_m, off_k])
        b = b_desc.load([off_n, off_k])
        acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)

    pid_m, pid_n = _tile_coords(tile_id_c, num_pid_in_group, num_pid_m, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    if EPILOGUE_SUBTILE:
        acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(acc)
        _epilogue_part(acc0, bias_ptr, r_desc, y_desc, off_m, off_n, Cout, HAS_RESIDUAL, RELU, BLOCK_N // 2)
        _epilogue_part(acc1, bias_ptr, r_desc, y_desc, off_m, off_n + BLOCK_N // 2, Cout, HAS_RESIDUAL, RELU,
                       BLOCK_N // 2)
    else:
        _epilogue_part(acc, bias_ptr, r_desc, y_desc, off_m, off_n, Cout, HAS_RESIDUAL, RELU, BLOCK_N)


@triton.jit
def gemm_bn_act_kernel(
    a_ptr, b_ptr, bias_ptr, res_ptr, y_ptr,
    M, Cin, Cout,
    M_BUCKET,  # not read: an autotuning key, M rounded up so that each layer shape tunes once
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,
):
    SPLIT: tl.constexpr = 2 if EPILOGUE_SUBTILE else 1
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, Cin], strides=[Cin, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[Cout, Cin], strides=[Cin, 1], block_shape=[BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, Cout], strides=[Cout, 1],
                                       block_shape=[BLOCK_M, BLOCK_N // SPLIT])
    if HAS_RESIDUAL:
        r_desc = tl.make_tensor_descriptor(res_ptr, shape=[M, Cout], strides=[Cout, 1],
                                           block_shape=[BLOCK_M, BLOCK_N // SPLIT])
    else:
        r_desc = y_desc  # a placeholder: never read

    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(Cout, BLOCK_N)
    k_tiles = tl.cdiv(Cin, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    tile_id_c = start_pid - NUM_SMS
    # Three spellings of one loop: tl.range's flatten / warp_specialize keywords are read only
    # in the branch a constexpr picks, so a triton without them compiles the plain loop.
    if WARP_SPECIALIZE:
        for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True, warp_specialize=True):
            tile_id_c += NUM_SMS
            _tile(tile_id, tile_id_c, a_desc, b_desc, r_desc, y_desc, bias_ptr, num_pid_in_group, num_pid_m,
                  k_tiles, Cout, HAS_RESIDUAL, RELU, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                  EPILOGUE_SUBTILE)
    elif FLATTEN:
        for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True):
            tile_id_c += NUM_SMS
            _tile(tile_id, tile_id_c, a_desc, b_desc, r_desc, y_desc, bias_ptr, num_pid_in_group, num_pid_m,
                  k_tiles, Cout, HAS_RESIDUAL, RELU, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                  EPILOGUE_SUBTILE)
    else:
        for tile_id in tl.range(start_pid, num_tiles, NUM_SMS):
            tile_id_c += NUM_SMS
            _tile(tile_id, tile_id_c, a_desc, b_desc, r_desc, y_desc, bias_ptr, num_pid_in_group, num_pid_m,
                  k_tiles, Cout, HAS_RESIDUAL, RELU, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                  EPILOGUE_SUBTILE)


# --------------------------------------------------------------------------------------------
# The scratch allocator for device-side descriptors
# --------------------------------------------------------------------------------------------
def _torch_scratch(size: int, alignment: int, stream):
    # torch's caching allocator returns 512-byte aligned blocks (TMA descriptors ask for 128),
    # on the current stream, which is the stream Triton launches on
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def _allocator_var():
    """triton's allocator ContextVar (runtime/_allocation.py, the same in 3.6 and 3.8), or None
    if a release moves it."""
    try:
        from triton.runtime import _allocation
    except ImportError:  # pragma: no cover - other releases
        return None, None
    var, null = getattr(_allocation, "_allocator", None), getattr(_allocation, "NullAllocator", None)
    if var is None or null is None or not hasattr(var, "get") or not hasattr(var, "reset"):
        return None, None  # pragma: no cover
    return var, null


_fallback_installed = False


@contextlib.contextmanager
def scratch_allocator():
    """The allocator this module's launches use for the descriptors' global scratch.

    triton 3.6 and 3.8 keep the allocator that ``triton.set_allocator`` sets in a ContextVar and
    call it synchronously at each launch that needs scratch. Where the caller's context already
    has one (anything but triton's NullAllocator), it is used as it is. Otherwise a torch
    allocation is installed for the duration of this block only (ContextVar.set, then reset
    with its token), so the caller's context is as it was afterwards: nothing is clobbered.
    (Were that ContextVar ever missing, ``triton.set_allocator`` is called once with the torch
    allocation, for this context, and left set.)
    """
    global _fallback_installed
    var, null = _allocator_var()
    if var is None:
        if not _fallback_installed:
            triton.set_allocator(_torch_scratch)
            _fallback_installed = True
        yield
        return
    if not isinstance(var.get(), null):
        yield
        return
    token = var.set(_torch_scratch)
    try:
        yield
    finally:
        var.reset(token)


# --------------------------------------------------------------------------------------------
# Where the kernel applies
# --------------------------------------------------------------------------------------------


def _pair(v, name):
    if isinstance(v, str):  # conv2d's padding="valid" / "same": no padding for a 1x1 at dilation 1
        if v not in ("valid", "same"):
            raise ValueError(f"{name}={v!r}: conv2d takes 'valid' or 'same'")
        return (0, 0)
    if isinstance(v, int):
        return (v, v)
    try:
        t = tuple(int(i) for i in v)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    return t * 2 if len(t) == 1 else t


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % TMA_ALIGN == 0


_capabilities: dict = {}


def _capability(device: torch.device) -> tuple[int, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _capabilities:
        _capabilities[idx] = torch.cuda.get_device_capability(idx)
    return _capabilities[idx]


def takes(x: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1, groups=1) -> tuple[bool, str]:
    """(True, "") when :func:`conv1x1_bn_act` applies to ``conv2d(x, weight, stride, padding,
    dilation, groups)``, else (False, why). Applies: a 1x1 conv, stride 1, no padding, dilation
    1, one group; x NHWC (channels_last-contiguous) and weight (Cout, Cin, 1, 1) contiguous of
    one dtype among float16/bfloat16/float32; both 16-byte aligned, Cin and Cout channels a
    multiple of 16 bytes (TMA's stride rule: 8 channels of 16 bits, 4 of fp32); a CUDA device
    of compute capability 9.0 or later (TMA), or CPU tensors under TRITON_INTERPRET=1."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False, "x and weight must be tensors"
    if x.dim() != 4 or weight.dim() != 4:
        return False, f"x and weight must be 4-D (got {x.dim()}-D and {weight.dim()}-D)"
    if tuple(weight.shape[2:]) != (1, 1):
        return False, f"not a 1x1 conv (kernel {tuple(weight.shape[2:])})"
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if stride != (1, 1):
        return False, f"stride {stride}: only stride 1 is a plain GEMM"
    if padding != (0, 0):
        return False, f"padding {padding}: only an unpadded conv is a plain GEMM"
    if dilation != (1, 1):
        return False, f"dilation {dilation} (a 1x1 conv's dilation must be 1 here)"
    if groups != 1:
        return False, f"groups={groups}: only groups=1"
    if x.dtype not in _TORCH_TO_TRITON:
        return False, f"dtype {x.dtype}: the kernel takes float16, bfloat16 or float32"
    if weight.dtype != x.dtype:
        return False, f"weight dtype {weight.dtype} differs from x dtype {x.dtype}"
    cin, cout = x.shape[1], weight.shape[0]
    if weight.shape[1] != cin:
        return False, f"weight has {weight.shape[1]} input channels, x has {cin}"
    if cin == 0:
        return False, "no input channels (Cin = 0)"
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False, "x is not NHWC (channels_last-contiguous)"
    if not weight.is_contiguous(memory_format=torch.channels_last):
        return False, "weight is not contiguous (Cout, Cin, 1, 1)"
    elem = x.element_size()
    if (cin * elem) % TMA_ALIGN:
        return False, (f"Cin = {cin} channels of {elem} bytes is not a multiple of {TMA_ALIGN} bytes "
                       f"(TMA stride alignment)")
    if (cout * elem) % TMA_ALIGN:
        return False, (f"Cout = {cout} channels of {elem} bytes is not a multiple of {TMA_ALIGN} bytes "
                       f"(TMA stride alignment)")
    for name, t in (("x", x), ("weight", weight)):
        if not _aligned(t):
            return False, f"{name}'s data pointer is not {TMA_ALIGN}-byte aligned (TMA base alignment)"
    if x.device != weight.device:
        return False, f"x on {x.device}, weight on {weight.device}"
    if x.device.type == "cuda":
        if INTERPRET:
            return False, "TRITON_INTERPRET=1 runs the kernels on CPU tensors, not CUDA ones"
        cap = _capability(x.device)
        if cap[0] < 9:
            return False, (f"sm_{cap[0]}{cap[1]} has no TMA (Hopper, sm_90, and later): Triton would lower "
                           f"the descriptors to plain loads, where conv_bn_act's pipeline is the tuned path")
    elif not INTERPRET:
        return False, f"{x.device.type} tensors: the kernel needs CUDA (or TRITON_INTERPRET=1 for CPU tensors)"
    return True, ""


# --------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------
def prune_configs(configs, named_args, **kwargs):
    """The autotuner's early pruning: BLOCK_N far wider than Cout is wasted work; a K block
    narrower than one 128-byte row is for fp32 only; fp32 under tf32x3 holds each operand as two
    halves in registers, and the wide tiles spill (as in conv_bn_act.prune_configs); and what
    does not fit in shared memory (4 stages of 128x256 with a residual tile, the 16-bit
    candidates in fp32) is dropped before it is compiled."""
    args = {**named_args, **kwargs}
    widest = max(64, triton.next_power_of_2(args["Cout"]))
    split_operands = args.get("INPUT_PRECISION") == "tf32x3"
    y = args.get("y_ptr")
    elem = y.element_size() if hasattr(y, "element_size") else 2

    def keep(c):
        acc_per_thread = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
        return (c.kwargs["BLOCK_N"] <= widest
                and c.kwargs["BLOCK_K"] * elem >= 128
                and not (split_operands and acc_per_thread * c.kwargs["BLOCK_K"] > 64 * 32)
                and shared_memory_bytes(c, elem, bool(args.get("HAS_RESIDUAL"))) <= _SMEM_LIMIT)

    kept = [c for c in configs if keep(c)]
    return kept or configs


#: the most dynamic shared memory one program may have on sm_90 (227 KB), less room for barriers
_SMEM_LIMIT = 227 * 1024 - 1024


def _autotuned(configs):
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=list(configs.values()),
                           key=["M_BUCKET", "Cin", "Cout", "HAS_RESIDUAL", "INPUT_PRECISION"],
                           prune_configs_by={"early_config_prune": prune_configs},
                           **extra)(gemm_bn_act_kernel)


# Autotuning in the interpreter would time numpy: there the one small config is used instead.
_tuned_kernel = None if INTERPRET else _autotuned(gemm_configs())


def _layer_args(m: int, cin: int, cout: int, dtype: torch.dtype, *, residual: bool, relu: bool, num_sms: int):
    """The scalar and constexpr kernel arguments of one layer (shared by the launcher and the
    ahead-of-time compile spec, so the report compiles exactly what runs)."""
    scalars = dict(M=m, Cin=cin, Cout=cout, M_BUCKET=triton.next_power_of_2(m))
    constexprs = dict(HAS_RESIDUAL=bool(residual), RELU=bool(relu), INPUT_PRECISION=input_precision(dtype),
                      NUM_SMS=int(num_sms), FLATTEN=HAS_FLATTEN, WARP_SPECIALIZE=False)
    return scalars, constexprs


def _asked_config(config):
    return config if config is not None else (os.environ.get(CONFIG_ENV_VAR) or None)


def _resolve_config(config):
    config = _asked_config(config)
    if isinstance(config, str):
        configs = gemm_configs()
        if config not in configs:
            raise ValueError(f"unknown GEMM config {config!r}; choose one of {list(configs)}")
        config = configs[config]
    if config is None and INTERPRET:
        config = INTERPRETER_CONFIG
    if config is not None and not isinstance(config, triton.Config):
        raise TypeError(f"config must be a triton.Config or a name from gemm_configs(), not {type(config).__name__}")
    return config


_num_sms: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _num_sms:
        _num_sms[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _num_sms[idx]


class _Launch:
    """What one layer's launches share: output shape, kernel arguments other than the tensors,
    and, once known, the config and the persistent grid. Keyed by everything it derives from."""

    __slots__ = ("out_shape", "scalars", "constexprs", "config", "kwargs", "grid")

    def __init__(self, out_shape, scalars, constexprs, config):
        self.out_shape = torch.Size(out_shape)
        self.scalars, self.constexprs = scalars, constexprs
        self.config = self.kwargs = self.grid = None
        if config is not None:
            self.set_config(config)

    def grid_fn(self, meta):
        tiles = triton.cdiv(self.scalars["M"], meta["BLOCK_M"]) * triton.cdiv(self.scalars["Cout"], meta["BLOCK_N"])
        return (max(1, min(self.constexprs["NUM_SMS"], tiles)),)

    def set_config(self, config: triton.Config):
        self.config = config
        self.grid = self.grid_fn(config.kwargs)
        self.kwargs = {**self.scalars, **self.constexprs, **config.all_kwargs()}


_launches: dict = {}
#: launch records kept (one per distinct layer call)
_MAX_LAUNCHES = 4096


def _launch_for(x, weight, residual: bool, relu: bool, config) -> _Launch:
    key = (tuple(x.shape), tuple(weight.shape), x.dtype, x.device, residual, relu, input_precision(x.dtype),
           config if config is None or isinstance(config, str) else id(config))
    launch = _launches.get(key)
    if launch is None:
        n, cin, h, w = x.shape
        cout = weight.shape[0]
        scalars, constexprs = _layer_args(n * h * w, cin, cout, x.dtype, residual=residual, relu=relu,
                                          num_sms=_sm_count(x.device))
        launch = _Launch((n, cout, h, w), scalars, constexprs, _resolve_config(config))
        if config is None or isinstance(config, str):  # a Config object may be a one-off: not kept
            if len(_launches) >= _MAX_LAUNCHES:
                _launches.clear()
            _launches[key] = launch
    return launch


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a.numel() > 0 and b.numel() > 0 and a0 < b1 and b0 < a1


def conv1x1_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None,
                   relu: bool = True, *, out: torch.Tensor | None = None,
                   config: triton.Config | str | None = None) -> torch.Tensor:
    """y = [relu](conv1x1(x, weight) + bias [+ residual]) by the persistent TMA GEMM.

    x: (N, Cin, H, W) channels_last; weight: (Cout, Cin, 1, 1) contiguous (channels_last and
    contiguous are one layout for 1x1); bias: Cout contiguous fp32; residual and ``out``:
    (N, Cout, H, W) channels_last, of x's dtype. ``out`` receives y when given (else y is
    allocated channels_last); it may not overlap an input. ``config`` (a triton.Config or a name
    from :func:`gemm_configs`) skips autotuning; so does RESNET_FAST_TRITON_GEMM_CONFIG.
    Raises ValueError/TypeError, with :func:`takes`'s reason, where the kernel does not apply.
    """
    ok, why = takes(x, weight)
    if not ok:
        raise ValueError(f"conv1x1_bn_act does not apply: {why}")
    cout = weight.shape[0]
    if not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32 or bias.shape != (cout,) \
            or not bias.is_contiguous() or bias.device != x.device:
        raise ValueError(f"bias must be a contiguous float32 tensor of shape ({cout},) on {x.device}")
    out_shape = torch.Size((x.shape[0], cout, x.shape[2], x.shape[3]))
    for name, t in (("residual", residual), ("out", out)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != out_shape or t.dtype != x.dtype or t.device != x.device:
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a {x.dtype} tensor of shape {tuple(out_shape)} on {x.device}, got {got}")
        if not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"{name} must be NHWC (channels_last-contiguous)")
        if not _aligned(t):
            raise ValueError(f"{name}'s data pointer is not {TMA_ALIGN}-byte aligned (TMA base alignment)")
    if out is not None:
        for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
            if t is not None and _overlaps(out, t):
                raise ValueError(f"out overlaps {name}: the kernel (and the autotuner's reruns) would read "
                                 f"what it wrote")
    config = _asked_config(config)  # part of the launch key
    launch = _launch_for(x, weight, residual is not None, bool(relu), config)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    # Triton launches on the current device (and the scratch is allocated there): make it x's
    on_device = (torch.cuda.device(x.device) if x.is_cuda and x.device.index != torch.cuda.current_device()
                 else contextlib.nullcontext())
    with on_device, scratch_allocator():
        if launch.kwargs is not None:  # config known: straight to the kernel
            gemm_bn_act_kernel[launch.grid](x, weight, bias, residual, out, **launch.kwargs)
            return out
        # First launch of this layer without a fixed config: the autotuner picks one (or finds its
        # earlier pick), and the launch record keeps it so later launches skip the autotuner.
        start = time.perf_counter()
        _tuned_kernel[launch.grid_fn](x, weight, bias, residual, out, **launch.scalars, **launch.constexprs)
    launch.set_config(_tuned_kernel.best_config)
    _log.info("resnet_fast: Triton TMA GEMM 1x1 %s->%s on %s %s%s tuned in %.1f s (%s)",
              x.shape[1], cout, "x".join(map(str, x.shape[2:])), str(x.dtype).replace("torch.", ""),
              " + residual" if residual is not None else "", time.perf_counter() - start,
              config_name(_tuned_kernel.best_config))
    return out


def chosen_configs() -> list[dict]:
    """The config each layer call of this process launched with (autotuned or fixed)."""
    out = []
    for key, launch in _launches.items():
        x_shape, w_shape, dtype, device, residual, relu, precision, _ = key
        out.append({"x": list(x_shape), "weight": list(w_shape), "dtype": str(dtype).replace("torch.", ""),
                    "device": str(device), "residual": residual, "relu": relu, "input_precision": precision,
                    "config": None if launch.config is None else config_name(launch.config),
                    "grid": None if launch.grid is None else launch.grid[0]})
    return out


# --------------------------------------------------------------------------------------------
# Ahead of time
# --------------------------------------------------------------------------------------------
def gemm_compile_spec(dtype: torch.dtype, m: int, cin: int, cout: int, *, residual: bool = False, relu: bool = True,
                      config: triton.Config | str, num_sms: int = DEFAULT_NUM_SMS) -> dict:
    """What ``triton.compile`` needs to build one layer's kernel ahead of time, no GPU required
    (the conventions of conv_bn_act.conv_compile_spec)::

        spec = gemm_compile_spec(torch.bfloat16, 50176, 1024, 256, residual=False,
                                 config="m128n256k64w8s3")
        kernel = triton_aot.compile_kernel(spec["fn"], spec["signature"], spec["constexprs"],
                                           spec["attrs"], spec["options"], 90)

    Pointers are marked 16-byte aligned, ints divisible by 16 where they are, ints equal to 1
    and the absent residual folded into constants, as the JIT derives them from real arguments.
    NUM_SMS (the persistent grid's program count, a constexpr) is ``num_sms``: 132 for an H100
    SXM or H200.

    Nothing extra is needed for the device-side descriptors: the compiler sizes their global
    scratch itself (``ttg.global_scratch_memory_size``, 128 bytes a descriptor on sm_90a, in
    the compiled kernel's metadata.global_scratch_size), and the launch allocates
    grid x that much through triton's allocator. For sm_80 the same spec compiles, with the
    descriptors rewritten into plain pointer loads (no TMA, no scratch); :func:`takes` refuses
    pre-Hopper devices at run time.
    """
    config = _resolve_config(config)
    if config is None:
        raise ValueError("gemm_compile_spec needs a config (a triton.Config or a name from gemm_configs())")
    scalars, constexprs = _layer_args(m, cin, cout, dtype, residual=residual, relu=relu, num_sms=num_sms)
    constexprs.update(config.kwargs)
    elem = "*" + _TORCH_TO_TRITON[dtype]
    pointers = dict(a_ptr=elem, b_ptr=elem, bias_ptr="*fp32", res_ptr=elem if residual else None, y_ptr=elem)
    return compile_spec(gemm_bn_act_kernel, pointers, scalars, constexprs,
                        {"num_warps": config.num_warps, "num_stages": config.num_stages})
