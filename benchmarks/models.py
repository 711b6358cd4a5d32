"""The ResNets under test: torchvision architectures, random weights, randomized BatchNorm.

torchvision's default init leaves BN an identity (mean 0, var 1, weight 1, bias 0), which makes
a wrong fold look right. Here every BN gets statistics from one real forward (so activations
keep a sane scale through 50+ layers, in bf16 too), then random perturbations of mean, var,
weight and bias (some negative weights), so folding is exercised for real."""

from __future__ import annotations

import copy

import torch

# torchvision is imported where used, not here: it imports triton, and the report must be able
# to set TRITON_INTERPRET (CPU runs of the triton backend) before triton is first imported.
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
          # timm's own ResNets (timm is a test extra): run end to end through the graph converter
          "timm:resnet50", "timm:resnetv2_50")


@torch.no_grad()
def randomize_bn(model: torch.nn.Module, calib: torch.Tensor, gen: torch.Generator) -> None:
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.momentum = 1.0          # running stats := this batch's stats
        m.train()
    model(calib)
    for m, (mom, tr) in zip(bns, saved):
        m.momentum = mom
        m.train(tr)
        c = m.num_features
        dev = m.running_mean.device

        def r(*shape):
            return torch.rand(*shape, generator=gen).to(dev)

        std = m.running_var.clamp_min(1e-5).sqrt()
        m.running_mean.add_(0.2 * std * torch.randn(c, generator=gen).to(dev))
        m.running_var.mul_(0.5 + 1.5 * r(c))
        sign = torch.where(r(c) < 0.1, -1.0, 1.0).to(dev)
        m.weight.copy_(sign * (0.5 + r(c)))
        m.bias.copy_(0.2 * torch.randn(c, generator=gen).to(dev))


def build(name: str, *, device: torch.device, resolution: int, seed: int,
          calib_batch: int = 8) -> torch.nn.Module:
    """The fp32 eval() model on device, weights and BN randomized from seed."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    torch.manual_seed(seed)
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[len("timm:"):], pretrained=False).to(device)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    calib = torch.randn(calib_batch, 3, resolution, resolution, generator=gen).to(device)
    # fp32 without TF32 so the statistics do not depend on the GPU's math mode
    with tf32_off():
        randomize_bn(model, calib, gen)
    return model.eval()


class tf32_off:
    """Context: full fp32 in matmul and cuDNN (for references), restored on exit."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
        return False


def cast(model: torch.nn.Module, dtype: torch.dtype, memory_format=torch.contiguous_format,
         *, copy_model: bool = True) -> torch.nn.Module:
    """A copy of the model in dtype and memory format (the eager peers: BN params in dtype too,
    as model.to(dtype) leaves them)."""
    m = copy.deepcopy(model) if copy_model else model
    return m.to(dtype=dtype).to(memory_format=memory_format)


@torch.no_grad()
def count_flops(model: torch.nn.Module, resolution: int) -> dict:
    """2*MACs per image of every conv and the fc (other layers are noise beside them),
    from shapes traced on the meta device (no compute, no memory)."""
    meta = copy.deepcopy(model).to("meta")
    per_module: dict[str, float] = {}
    hooks = []
    for name, m in meta.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            def hook(mod, inp, out, name=name):
                _, co, ho, wo = out.shape
                kh, kw = mod.kernel_size
                per_module[name] = 2.0 * co * ho * wo * (mod.in_channels // mod.groups) * kh * kw
            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, torch.nn.Linear):
            def hook(mod, inp, out, name=name):
                per_module[name] = 2.0 * mod.in_features * mod.out_features
            hooks.append(m.register_forward_hook(hook))
    meta(torch.empty(1, 3, resolution, resolution, device="meta"))
    for h in hooks:
        h.remove()
    return {"per_image": sum(per_module.values()), "per_module": per_module}
