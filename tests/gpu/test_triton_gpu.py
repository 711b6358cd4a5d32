"""The compiled Triton kernels on a CUDA device: every distinct conv of ResNet-50, edge shapes,
every tuning candidate, 64-bit offsets, the registered ops (opcheck, CUDA graphs).

Launches name a config (``config=``) or set RESNET_FAST_TRITON_CONV_CONFIG, so that only
test_autotuned_launch pays for autotuning.
"""

import pytest
import torch
import torch.nn.functional as F

from resnet_fast import backends

from ..conftest import needs_cuda
from ..conv_cases import RESNET50_CONVS, launch, reference
from ..conv_cases import make_conv as _make_conv
from ..reference import rel_err

pytestmark = needs_cuda
triton = pytest.importorskip("triton", reason="triton is not installed")

from resnet_fast.kernels import add_relu as add_relu_kernels  # noqa: E402
from resnet_fast.kernels import conv_bn_act as conv_kernels  # noqa: E402

CL = torch.channels_last
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# A config that fits every dtype's shared memory on sm_80 and sm_90, for each K path.
TAP_CONFIG = "m128n64k32w4s4"
FLAT_CONFIG = "m128n64k32w4s3"



def _id(c):
    cin, cout, k, s, p, h, epi = c
    return f"{cin}-{cout}_{k}x{k}s{s}_{h}px_{epi}"


@pytest.fixture
def tf32(request):
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = request.param
    yield request.param
    torch.backends.cudnn.allow_tf32 = saved


def make_conv(*args, **kw):
    return _make_conv(*args, device="cuda", **kw)


def config_for(cin):
    return FLAT_CONFIG if cin < conv_kernels.SMALL_CIN else TAP_CONFIG


def check(args, relu, dtype, **kw):
    """Launch into a NaN-filled output and compare with the float64 reference."""
    ref = reference(args, relu, torch.float64)
    out = torch.full(ref.shape, float("nan"), device="cuda", dtype=dtype).contiguous(memory_format=CL)
    y = launch(args, relu, out=out, config=kw.pop("config", config_for(args["x"].shape[1])), **kw)
    err = rel_err(y, ref)
    if dtype == torch.float32:
        # TF32 rounds the operands to 10 mantissa bits (cuDNN may or may not use it for a
        # given shape, so its error is no yardstick here).
        assert err < (2e-3 if torch.backends.cudnn.allow_tf32 else 1e-5), err
    else:
        torch_err = rel_err(reference(args, relu, dtype), ref)  # cuDNN in dtype
        assert err < 1e-2 and err <= 2 * torch_err, (err, torch_err)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv", RESNET50_CONVS, ids=_id)
def test_resnet50_convs(conv, dtype):
    cin, cout, k, s, p, h, epi = conv
    args = make_conv(cin, cout, k, s, p, h, h, 8, dtype, residual=epi == "res")
    check(args, epi != "none", dtype)


@pytest.mark.parametrize("tf32", [False], indirect=True)
@pytest.mark.parametrize("conv", [RESNET50_CONVS[0], RESNET50_CONVS[2], RESNET50_CONVS[8]], ids=_id)
def test_fp32_exact_without_tf32(conv, tf32):
    cin, cout, k, s, p, h, epi = conv
    check(make_conv(cin, cout, k, s, p, h, h, 2, torch.float32, residual=epi == "res"), epi != "none",
          torch.float32)


# name: (Cin, Cout, k, stride, pad, dilation, (N, H, W)). Channels, pixels and K that are not
# multiples of any block; Cin not a multiple of 16 (the JIT cannot then prove rows 16-byte
# aligned, so loads are narrower); the flat path at other shapes; dilation; a single pixel.
EDGES = {
    "3x3_unaligned": (24, 20, 3, 1, 1, 1, (3, 17, 15)),
    "1x1_s2_odd": (20, 72, 1, 2, 0, 1, (2, 19, 21)),
    "3x3_dil2": (40, 36, 3, 1, 2, 2, (1, 23, 9)),
    "stem_cout130": (3, 130, 7, 2, 3, 1, (2, 37, 29)),
    "flat_3x3_s2": (5, 16, 3, 2, 1, 1, (1, 9, 9)),
    "1px": (64, 64, 3, 1, 1, 1, (1, 1, 1)),
}


@pytest.mark.parametrize("dtype,pre", [(torch.bfloat16, False), (torch.bfloat16, True),
                                       (torch.float16, False), (torch.float32, True)],
                         ids=["bf16", "bf16-pre", "fp16", "fp32-pre"])
@pytest.mark.parametrize("edge", list(EDGES))
def test_edge_shapes(edge, dtype, pre):
    cin, cout, k, s, p, d, (n, h, w) = EDGES[edge]
    check(make_conv(cin, cout, k, s, p, h, w, n, dtype, residual=True, pre=pre, dilation=d), True, dtype)


@pytest.mark.parametrize("small_cin", [False, True], ids=["tap", "flat"])
def test_every_tuning_candidate(small_cin):
    # Every config the autotuner may pick compiles and computes the same thing (bf16).
    shape = (3, 64, 7, 2, 3, 30, 30, 2) if small_cin else (64, 96, 3, 1, 1, 15, 13, 3)
    for name in conv_kernels.conv_configs(small_cin):
        check(make_conv(*shape, torch.bfloat16, residual=True), True, torch.bfloat16, config=name)


def test_autotuned_launch():
    args = make_conv(64, 64, 3, 1, 1, 14, 14, 4, torch.bfloat16, residual=True)
    ref = reference(args, True, torch.float64)
    assert rel_err(launch(args, True), ref) < 1e-2


def _free_bytes():
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def test_conv_64bit_offsets():
    # 130 x 64 x 512 x 512 > 2**31 elements in, and out: the launcher switches to 64-bit index math.
    n, c, hw = 130, 64, 512
    if _free_bytes() < 3 * n * c * hw * hw * 2:
        pytest.skip("not enough GPU memory for two 4.4 GB tensors")
    x = torch.randn(n, c, hw, hw, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL)
    w = (torch.randn(c, c, 1, 1, device="cuda") / 8).to(torch.bfloat16).contiguous(memory_format=CL)
    b = torch.randn(c, device="cuda")
    y = conv_kernels.conv_bn_act(x, w, b, (1, 1), (0, 0), (1, 1), config=TAP_CONFIG)
    for imgs in (slice(0, 1), slice(n - 2, n)):  # before and past the 2**31st element
        ref = torch.relu(F.conv2d(x[imgs].double(), w.double()) + b.double().view(1, -1, 1, 1))
        assert rel_err(y[imgs], ref) < 1e-2


def test_add_relu_64bit_offsets():
    n = 2**31 + 4097  # past 2**31, and a partial last block
    if _free_bytes() < 3 * n * 2 + 2**30:
        pytest.skip("not enough GPU memory for three 4.3 GB tensors")
    a = torch.randn(n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, device="cuda", dtype=torch.float16)
    out = add_relu_kernels.add_relu(a, b)
    for part in (slice(0, 2**20), slice(n - 2**20, n)):
        assert torch.equal(out[part], torch.relu(a[part] + b[part]))
    del out
    add_relu_kernels.add_relu_(a, b)
    tail = slice(n - 2**20, n)
    assert (a[tail] >= 0).all() and not a[tail].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
def test_add_relu(fmt, dtype):
    a, b = (torch.randn(4, 37, 13, 11, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
            for _ in range(2))
    a[0, 0, 0, 0] = float("nan")
    ref = torch.relu(a + b)
    out = add_relu_kernels.add_relu(a, b)
    assert out.stride() == ref.stride()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    add_relu_kernels.add_relu_(a, b)
    assert torch.equal(a.nan_to_num(), ref.nan_to_num())


@pytest.fixture
def fixed_config(monkeypatch):
    monkeypatch.setenv(conv_kernels.CONFIG_ENV_VAR, TAP_CONFIG)


def _op_args(dtype=torch.bfloat16):
    a = make_conv(32, 48, 3, 2, 1, 11, 9, 2, dtype, residual=True, pre=True)
    return (a["x"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], 1,
            a["residual"], True, a["pre_scale"], a["pre_bias"])


def test_opcheck(fixed_config):
    backends.get("triton")  # registers the ops
    torch.library.opcheck(torch.ops.resnet_fast.conv_bn_act_triton.default, _op_args())
    a, b = (torch.randn(2, 8, 5, 7, device="cuda").contiguous(memory_format=CL) for _ in range(2))
    torch.library.opcheck(torch.ops.resnet_fast.add_relu_triton.default, (a, b))
    torch.library.opcheck(torch.ops.resnet_fast.add_relu_inplace_triton.default, (a, b))


def test_cuda_graph_capture(fixed_config):
    backends.get("triton")
    conv = torch.ops.resnet_fast.conv_bn_act_triton
    add_relu_ = torch.ops.resnet_fast.add_relu_inplace_triton
    args = list(_op_args())
    x = args[0]
    other = torch.randn_like(x)

    def step():
        y = conv(*args)
        add_relu_(y, args[7])
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = step()
    x.copy_(other)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, step())
