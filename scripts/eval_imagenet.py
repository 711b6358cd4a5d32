"""Top-1 / top-5 of a torchvision ResNet on ImageNet's validation set: fp32, bf16 and fp8 side by side.

    python scripts/eval_imagenet.py --val /data/imagenet/val --weights resnet50-11ad3fa6.pth \\
        [--arch resnet50] [--calib 1024] [--batch 256] [--method mse] [--backend auto]

``--val``: a folder of class subfolders (torchvision's ImageFolder layout: the 1,000 synset folders
sorted, as torchvision's weights expect). ``--weights``: a state_dict file for ``--arch``. Nothing is
downloaded. The fp8 model is calibrated on ``--calib`` images drawn with a fixed seed from
``--calib-dir``, else from ``--val`` itself: give ``--calib-dir`` (a slice of the training set) to
keep calibration and evaluation apart, as a published figure should. Needs a CUDA device with fp8 tensor cores for the fp8 kernel (sm_89+; elsewhere
the fp8 column runs the reference op, slowly).

Published reference for the method (PyTorch's own): torchvision's int8 post-training-quantized
ResNet-50 (``ResNet50_QuantizedWeights.IMAGENET1K_FBGEMM_V1``) scores top-1 75.920 against the
float model's 76.130.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def _loader(folder: str, batch: int, workers: int, limit: int | None = None, seed: int = 0):
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = datasets.ImageFolder(folder, tf)
    if limit is not None:
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
        ds = torch.utils.data.Subset(ds, idx)
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=True)


@torch.no_grad()
def _evaluate(model, loader, dtype, device) -> tuple[float, float, float]:
    top1 = top5 = n = 0
    t0 = time.perf_counter()
    for x, y in loader:
        x = x.to(device, dtype, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        pred = model(x).float().topk(5, 1).indices
        top1 += (pred[:, 0] == y).sum().item()
        top5 += (pred == y[:, None]).any(1).sum().item()
        n += y.numel()
    return 100 * top1 / n, 100 * top5 / n, time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--val", required=True, help="ImageNet validation folder (ImageFolder layout)")
    p.add_argument("--weights", required=True, help="state_dict file for --arch")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--calib", type=int, default=1024, help="calibration images (default 1024)")
    p.add_argument("--calib-dir", help="take calibration images from here (default: --val)")
    p.add_argument("--method", default="mse", choices=["mse", "max", "percentile"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--backend", default="auto")
    a = p.parse_args(argv)

    import torchvision
    import resnet_fast as rf

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = getattr(torchvision.models, a.arch)()
    base.load_state_dict(torch.load(a.weights, map_location="cpu", weights_only=True))
    base.eval()
    loader = _loader(a.val, a.batch, a.workers)
    rows = []
    fp32 = base.to(device)
    rows.append(("fp32 (torchvision)",) + _evaluate(fp32, loader, torch.float32, device))
    bf16 = rf.convert(copy.deepcopy(base), backend=a.backend).to(device, torch.bfloat16).eval()
    rows.append(("bf16 (resnet_fast)",) + _evaluate(bf16, loader, torch.bfloat16, device))
    q = rf.convert(copy.deepcopy(base), backend=a.backend).to(device, torch.bfloat16).eval()
    calib = _loader(a.calib_dir or a.val, a.batch, a.workers, limit=a.calib, seed=1)
    rf.quantize_fp8(q, (x.to(device, torch.bfloat16).contiguous(memory_format=torch.channels_last)
                        for x, _ in calib), method=a.method)
    rows.append((f"fp8 e4m3 (resnet_fast, {a.method}, {a.calib} calibration images)",)
                + _evaluate(q, loader, torch.bfloat16, device))
    print(f"\n{a.arch} on {a.val} ({device}):")
    print(f"{'':<56} {'top-1':>7} {'top-5':>7} {'eval s':>8}")
    for name, t1, t5, s in rows:
        print(f"{name:<56} {t1:7.3f} {t5:7.3f} {s:8.1f}")
    print("\nreference (torchvision, int8 PTQ): ResNet-50 top-1 76.130 -> 75.920")


if __name__ == "__main__":
    main()
