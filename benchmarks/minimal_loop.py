"""The baseline `segkit train` is measured against: a minimal hand-written smp training loop, as a
user would write it from the smp examples, doing the same work.

Same model (Unet), encoder, batch, crop, optimizer (AdamW, warm-up + cosine), loss, augmentation
(random crop, flips, 90-degree turns, brightness/contrast jitter) on the same images cached in
memory as uint8, the same number of steps; then one validation pass (full-size images, padded
to the stride) and one checkpoint. It prints JSON: seconds and validation Dice.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def load(pairs: list[tuple[str, str]], binary: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for image, mask in pairs:
        img = cv2.cvtColor(cv2.imread(image, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        m = cv2.imread(mask, cv2.IMREAD_GRAYSCALE)
        out.append((img, (m > 0).astype(np.uint8) if binary else m))
    return out


def sample(data, crop: int, rng: np.random.Generator, fill: int) -> tuple[np.ndarray, np.ndarray]:
    img, m = data[rng.integers(len(data))]
    h, w = m.shape
    y, x = rng.integers(0, max(1, h - crop + 1)), rng.integers(0, max(1, w - crop + 1))
    img, m = img[y:y + crop, x:x + crop], m[y:y + crop, x:x + crop]
    if img.shape[0] < crop or img.shape[1] < crop:
        ph, pw = crop - img.shape[0], crop - img.shape[1]
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
        m = np.pad(m, ((0, ph), (0, pw)), constant_values=fill)
    if rng.random() < 0.5:
        img, m = img[:, ::-1], m[:, ::-1]
    if rng.random() < 0.5:
        img, m = img[::-1], m[::-1]
    if rng.random() < 0.5:
        k = int(rng.integers(1, 4))
        img, m = np.rot90(img, k), np.rot90(m, k)
    return np.ascontiguousarray(img), np.ascontiguousarray(m)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=Path, required=True, help="JSON {train: [[image, mask]], val: [...]}")
    p.add_argument("--classes", type=int, required=True, help="1 = binary sigmoid, N = softmax")
    p.add_argument("--ignore", type=int, default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    began = time.perf_counter()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pairs = json.loads(a.pairs.read_text())
    binary = a.classes == 1
    ig = a.ignore if a.ignore is not None else 255
    train, val = load(pairs["train"], binary), load(pairs["val"], binary)
    model = smp.Unet(a.encoder, encoder_weights=None, classes=a.classes)
    mode = "binary" if binary else "multiclass"
    dice = smp.losses.DiceLoss(mode, from_logits=True, ignore_index=ig)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    warm = max(1, min(a.warmup, a.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))
    model.train()
    for _ in range(a.steps):
        batch = [sample(train, a.crop, rng, ig) for _ in range(a.batch_size)]
        x = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2).float()
        x = (x - MEAN) / STD
        if rng.random() < 0.3:
            x = x * rng.uniform(0.9, 1.1) + rng.uniform(-0.25, 0.25)
        y = torch.from_numpy(np.stack([b[1] for b in batch])).long()
        logits = model(x)
        if binary:
            valid = (y != ig).float()
            t = torch.where(y == ig, ig, y).float()
            loss = (F.binary_cross_entropy_with_logits(logits[:, 0], (y == 1).float(), weight=valid)
                    + dice(logits, t[:, None]))
        else:
            loss = F.cross_entropy(logits, y, ignore_index=ig) + dice(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    tp = fp = fn = 0
    classes = max(1, a.classes)
    tp, fp, fn = np.zeros(classes), np.zeros(classes), np.zeros(classes)
    with torch.inference_mode():
        for img, m in val:
            h, w = m.shape
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
            x = F.pad((x - MEAN) / STD, (0, -w % 32, 0, -h % 32), mode="reflect")
            logits = model(x)[..., :h, :w]
            pred = (logits[0, 0] > 0).numpy() if binary else logits[0].argmax(0).numpy()
            for c in range(classes):
                keep = m != ig
                pc, tc = (pred == (1 if binary else c)) & keep, (m == (1 if binary else c)) & keep
                tp[c] += (pc & tc).sum()
                fp[c] += (pc & ~tc).sum()
                fn[c] += (~pc & tc).sum()
    denom = 2 * tp + fp + fn
    per_class = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    torch.save(model.state_dict(), a.out)
    print(json.dumps({"seconds": time.perf_counter() - began, "val_mean_dice": float(np.nanmean(per_class))}))


if __name__ == "__main__":
    main()
