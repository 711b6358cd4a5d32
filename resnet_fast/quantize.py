"""Post-training fp8 (e4m3) quantization of a converted torchvision ResNet.

    model = resnet_fast.convert(torchvision.models.resnet50(weights=...)).eval().cuda().bfloat16()
    resnet_fast.quantize_fp8(model, calibration_batches)      # in place; returns model
    logits = model(images)                                    # fp8 convs, bf16 stem and head
    print(resnet_fast.fusion_summary(model))                  # the "precision" column
    print(resnet_fast.quantize.layer_sqnr(model, batch))      # per-layer SQNR against fp32

What runs in eval() (resnet_fast.fp8 has the arithmetic, resnet_fast.fp8_ops the op):

* the stem (3 image channels) and its max-pool in the model's own dtype: an fp8 stem would
  quantize the image, and its K = 147 is too short for the 8-bit MMA to pay; the pool output
  is quantized once, to the first block's input scale;
* every block conv in fp8: e4m3 input and weight (per-output-channel scales of the folded
  weight, computed in the fold cache, so never stale), fp32 accumulation and epilogue
  (dequantize, bias, residual, ReLU), and the output requantized to the next tensor's scale with
  saturation; the identity shortcut is the block input as stored (e4m3), a projection shortcut
  writes e4m3 with a scale of its own;
* the last block writes the model's dtype (its output feeds the average pool and the fc, which
  stay as they are): a calibrated fp8 logit layer would gain nothing measurable.

Activation scales are per tensor, chosen by a calibration pass over batches you give
(:class:`resnet_fast.fp8.Observer`: ``"mse"`` by default, ``"max"``, ``"percentile"``) and stored
as buffers of the blocks (``fp8_input_scale``, ``fp8_act1_scale``, ``fp8_act2_scale``,
``fp8_shortcut_scale``, ``fp8_output_scale``), so ``state_dict`` carries them and ``.to()`` moves
them. They are calibration data, not derived tensors: after training the model further,
calibrate again (:func:`quantize_fp8` on the same model recalibrates).

The fp8 forward runs for a model in eval() with nothing asking for gradients and no module
hooks; anything else (train(), autograd, hooks) runs the model's unquantized forward, said once
in a warning. Pre-activation ResNets and models other than torchvision's ResNet class (timm,
your own) are refused with the reason: their fp8 path is future work.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from . import backends, fp8
from .fusion_rules import fusable_downsample, has_hooks
from .modules import FusedBlock, fused_conv, fused_max_pool, global_hooks
from .ops import is_nhwc

__all__ = ["is_quantized", "layer_sqnr", "quantize_fp8"]

_PLAN = "_resnet_fast_fp8"


def _blocks(model) -> list[tuple[str, FusedBlock]]:
    return [(f"{ln}.{i}", b) for ln in ("layer1", "layer2", "layer3", "layer4")
            for i, b in enumerate(getattr(model, ln))]


def _check_model(model: nn.Module) -> None:
    from .convert import FusedResNet
    if FusedResNet is None or not isinstance(model, FusedResNet):
        raise TypeError("quantize_fp8 takes a converted torchvision ResNet (resnet_fast.convert("
                        "torchvision.models.resnetXX(...))); other models have no fp8 path yet, "
                        f"got {type(model).__name__}")
    for name, b in _blocks(model):
        if not isinstance(b, FusedBlock):
            raise TypeError(f"{name} is a {type(b).__name__}, not a fused block: convert the model first")
        if b.downsample is not None and fusable_downsample(b.downsample) is None:
            raise TypeError(f"{name}.downsample is not a conv1x1 + BatchNorm: no fp8 path for it")


def is_quantized(model: nn.Module) -> bool:
    return model.__dict__.get(_PLAN) is not None


def _tensor_names(b: FusedBlock) -> list[str]:
    """The e4m3 tensors a block reads or writes, by buffer name (see the module doc)."""
    names = ["fp8_input_scale"] + [f"fp8_act{i + 1}_scale" for i in range(len(b._units) - 1)]
    if fusable_downsample(b.downsample) is not None:
        names.append("fp8_shortcut_scale")
    return names + ["fp8_output_scale"]


def quantize_fp8(model: nn.Module, calibration: Iterable[torch.Tensor], *, method: str = "mse",
                 percentile: float = 99.99) -> nn.Module:
    """Calibrate ``model``'s activation scales on ``calibration`` (an iterable of input batches,
    as the model takes them) and switch its eval() forward to fp8 (see the module doc). In
    place; returns the model."""
    _check_model(model)
    observers: dict[str, fp8.Observer] = {}

    def obs(key):
        if key not in observers:
            observers[key] = fp8.Observer(method, percentile)
        return observers[key]

    hooks = []

    def watch(module, key, relu):
        def hook(m, inputs, out):
            obs(key).update(torch.relu(out) if relu else out)
        hooks.append(module.register_forward_hook(hook))

    blocks = _blocks(model)
    watch(model.maxpool, "input", False)
    for name, b in blocks:
        mods = b._modules
        for i, (_, bn) in enumerate(b._units[:-1]):
            watch(mods[bn], f"{name}.act{i + 1}", True)
        if fusable_downsample(b.downsample) is not None:
            watch(b.downsample, f"{name}.shortcut", False)
        watch(b, f"{name}.out", False)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in calibration:
                model(batch)  # the hooks make it run the modules' own math: fp32/bf16 reference
                seen += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("quantize_fp8 needs at least one calibration batch")
    device = model.conv1.weight.device
    precision = {"conv1": ("bf16" if model.conv1.weight.dtype == torch.bfloat16 else str(model.conv1.weight.dtype).replace("torch.", ""),
                           "the stem reads the image: kept in the model's dtype")}
    for k, (name, b) in enumerate(blocks):
        prev = "input" if k == 0 else f"{blocks[k - 1][0]}.out"
        keys = [prev] + [f"{name}.act{i + 1}" for i in range(len(b._units) - 1)]
        if fusable_downsample(b.downsample) is not None:
            keys.append(f"{name}.shortcut")
        keys.append(f"{name}.out")
        for buf, key in zip(_tensor_names(b), keys):
            scale = observers[key].scale().to(device)
            if buf in b._buffers and b._buffers[buf] is not None and b._buffers[buf].shape == scale.shape:
                with torch.no_grad():
                    b._buffers[buf].copy_(scale)  # recalibration: in place (CUDA graphs read it)
            else:
                b.register_buffer(buf, scale)
        last = k == len(blocks) - 1
        for i, (c, _) in enumerate(b._units):
            out = ("fp8 in, " + ("model dtype out (feeds the head)" if last else "fp8 out")) \
                if i == len(b._units) - 1 else "fp8"
            precision[f"{name}.{c}"] = ("fp8", out)
        if fusable_downsample(b.downsample) is not None:
            precision[f"{name}.downsample.0"] = ("fp8", "fp8")
    model.__dict__[_PLAN] = {"method": method, "percentile": percentile, "batches": seen,
                             "precision": precision}
    return model


def precision_of(model: nn.Module) -> Optional[dict]:
    """conv name -> (precision, detail) of a quantized model, else None."""
    plan = model.__dict__.get(_PLAN)
    return None if plan is None else plan["precision"]


# --------------------------------------------------------------------------------------
# The fp8 forward
# --------------------------------------------------------------------------------------
def why_not_fp8(model: nn.Module, x: torch.Tensor) -> Optional[str]:
    """Why this call of a quantized model runs its unquantized forward, or None."""
    if model.training or any(m.training for m in model.modules()):
        return "the model is in train()"
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters())):
        return "autograd is recording (wrap the call in torch.no_grad() or inference_mode())"
    if global_hooks() or any(has_hooks(m) for m in model.modules()):
        return "module hooks are registered (they would not fire on the fused fp8 path)"
    if x.dim() != 4:
        return None  # the unquantized forward raises the error
    return None


def forward_fp8(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A quantized FusedResNet's forward (see the module doc)."""
    be = backends.fp8_backend(model.backend, x.device)
    x = fused_conv(x, model.conv1, model.bn1, model._stem_unit, relu=True, backend=model.backend)
    x = fused_max_pool(model.maxpool, x, model.backend)
    if not is_nhwc(x):
        x = x.contiguous(memory_format=torch.channels_last)
    blocks = [b for _, b in _blocks(model)]
    q = fp8.quantize(x, blocks[0].fp8_input_scale).contiguous(memory_format=torch.channels_last)
    for i, b in enumerate(blocks):
        q = block_fp8(b, q, be, last=i == len(blocks) - 1, out_dtype=x.dtype)
    x = model.avgpool(q)
    return model.fc(torch.flatten(x, 1))


def conv_fp8(x, conv, bn, state, x_scale, be, *, relu, residual=None, res_scale=None,
             out_scale=None, out_dtype=torch.bfloat16):
    wq, bias, w_scale, _ = state.fp8.get(conv, bn, None, fp8.E4M3, be)
    return be.conv_bn_act_fp8(x, wq, bias, w_scale, x_scale, list(conv.stride), list(conv.padding),
                              list(conv.dilation), conv.groups, residual, res_scale, relu, out_scale,
                              out_dtype)


def block_fp8(block: FusedBlock, q: torch.Tensor, be, *, last: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """One block on e4m3 tensors: q is its input as stored; returns its output (e4m3, or
    ``out_dtype`` for the last block)."""
    mods, states, units = block._modules, block._unit_states, block._units
    h, s = q, block.fp8_input_scale
    for i, (c, bn) in enumerate(units[:-1]):
        out_s = getattr(block, f"fp8_act{i + 1}_scale")
        h = conv_fp8(h, mods[c], mods[bn], states[c], s, be, relu=True, out_scale=out_s)
        s = out_s
    ds = fusable_downsample(mods.get("downsample"))
    if ds is not None:
        r = conv_fp8(q, ds[0], ds[1], states["downsample"], block.fp8_input_scale, be, relu=False,
                     out_scale=block.fp8_shortcut_scale)
        rs = block.fp8_shortcut_scale
    else:
        r, rs = q, block.fp8_input_scale
    c, bn = units[-1]
    return conv_fp8(h, mods[c], mods[bn], states[c], s, be, relu=True, residual=r, res_scale=rs,
                    out_scale=None if last else block.fp8_output_scale, out_dtype=out_dtype)


# --------------------------------------------------------------------------------------
# The accuracy contract, per layer
# --------------------------------------------------------------------------------------
def layer_sqnr(model: nn.Module, batch: torch.Tensor) -> list[dict]:
    """Per fp8 conv unit: the SQNR (dB) of its output against the float32 reference output of
    the same layer, both fed the reference input of that layer (quantized to the layer's input
    scale for the fp8 one): each layer's own quantization error, not the accumulated one.
    Rows {"conv", "sqnr_db"} in model order."""
    if not is_quantized(model):
        raise ValueError("layer_sqnr takes a model quantize_fp8 has calibrated")
    ref = _reference_activations(model, batch)
    be = backends.fp8_backend(model.backend, batch.device)
    rows = []
    blocks = _blocks(model)
    with torch.no_grad():
        for k, (name, b) in enumerate(blocks):
            mods, states, units = b._modules, b._unit_states, b._units
            inp = ref[f"{name}.in"]
            q_in = _q(inp, b.fp8_input_scale)
            acts = [inp] + [ref[f"{name}.act{i + 1}"] for i in range(len(units) - 1)]
            scales = [b.fp8_input_scale] + [getattr(b, f"fp8_act{i + 1}_scale") for i in range(len(units) - 1)]
            for i, (c, bn) in enumerate(units[:-1]):
                out = conv_fp8(_q(acts[i], scales[i]), mods[c], mods[bn], states[c], scales[i], be,
                               relu=True, out_dtype=torch.float32)
                rows.append({"conv": f"{name}.{c}", "sqnr_db": fp8.sqnr_db(out, acts[i + 1])})
            ds = fusable_downsample(mods.get("downsample"))
            if ds is not None:
                r_ref = ref[f"{name}.shortcut"]
                out = conv_fp8(q_in, ds[0], ds[1], states["downsample"], b.fp8_input_scale, be,
                               relu=False, out_dtype=torch.float32)
                rows.append({"conv": f"{name}.downsample.0", "sqnr_db": fp8.sqnr_db(out, r_ref)})
                r, rs = _q(r_ref, b.fp8_shortcut_scale), b.fp8_shortcut_scale
            else:
                r, rs = q_in, b.fp8_input_scale
            c, bn = units[-1]
            out = conv_fp8(_q(acts[-1], scales[-1]), mods[c], mods[bn], states[c], scales[-1], be,
                           relu=True, residual=r, res_scale=rs, out_dtype=torch.float32)
            rows.append({"conv": f"{name}.{c}", "sqnr_db": fp8.sqnr_db(out, ref[f"{name}.out"])})
    return rows


def _q(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return fp8.quantize(t, scale).contiguous(memory_format=torch.channels_last)


def _reference_activations(model: nn.Module, batch: torch.Tensor) -> dict:
    """The float32 tensors every fp8 layer reads and writes, from the model's own math in
    float32 (a copy of the model: the hooks and the dtype change leave it alone)."""
    import copy
    ref = copy.deepcopy(model).float()
    ref.__dict__.pop(_PLAN, None)
    got, hooks = {}, []

    def keep(module, key, relu=False, inputs=False):
        def hook(m, args, out):
            v = args[0] if inputs else out
            got[key] = (torch.relu(v) if relu else v).detach().float()
        hooks.append(module.register_forward_hook(hook))

    for name, b in _blocks(ref):
        keep(b, f"{name}.in", inputs=True)
        for i, (_, bn) in enumerate(b._units[:-1]):
            keep(b._modules[bn], f"{name}.act{i + 1}", relu=True)
        if fusable_downsample(b.downsample) is not None:
            keep(b.downsample, f"{name}.shortcut")
        keep(b, f"{name}.out")
    with torch.no_grad():
        ref.eval()(batch.float())
    for h in hooks:
        h.remove()
    return got
