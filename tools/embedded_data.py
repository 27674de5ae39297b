"""Generate the embedded dataset: a small, seeded, COCO-format detection dataset of shapes.

It lets the whole pipeline (teacher training, stage one, stage two) run with no download.
Same seed and variant give the same image bytes and the same JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "cross")


@dataclass(frozen=True)
class Variant:
    """How many images each split has; `tiny` keeps CI fast."""

    name: str
    train: int
    val: int


VARIANTS = {
    "default": Variant("default", train=240, val=60),
    "tiny": Variant("tiny", train=16, val=8),
}

# (width, height) of generated images: landscape, portrait and square, so the store and the
# student's batching see several aspect ratios and resize cases.
SIZES = ((224, 160), (256, 176), (192, 144), (160, 224), (176, 256), (192, 192), (288, 160), (160, 288))


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A textured background: a colour gradient, low-frequency blobs, stripes and noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / max(w, h)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    low = rng.normal(0, 1, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    low = np.asarray(Image.fromarray(((low - low.min()) / (np.ptp(low) + 1e-6) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    img += (low - 128) * rng.uniform(0.1, 0.35)
    if rng.random() < 0.5:
        period = rng.uniform(6, 24)
        stripe_angle = rng.uniform(0, math.pi)
        s = np.sin((xx * math.cos(stripe_angle) + yy * math.sin(stripe_angle)) * 2 * math.pi / period)
        img += s[..., None] * rng.uniform(5, 25)
    img += rng.normal(0, rng.uniform(2, 10), img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _shape_polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        r = r / math.sqrt(2) * 1.2
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "cross":
        a, b = 1.0, 0.33
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    else:
        return None
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _iou(a: list[float], b: list[float]) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    ix = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    iy = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter + 1e-9)


def _draw_image(rng: np.random.Generator, w: int, h: int, empty: bool):
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    annos: list[dict] = []
    n = 0 if empty else int(rng.integers(1, 7))
    for _ in range(n * 4):  # rejection sampling keeps overlaps partial
        if len(annos) == n:
            break
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        r = float(rng.uniform(7, min(w, h) * 0.22))
        cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
        rot = float(rng.uniform(0, 2 * math.pi))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        poly = _shape_polygon(kind, cx, cy, r, rot)
        if poly is None:
            box = [cx - r, cy - r, 2 * r, 2 * r]
        else:
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        box = [max(0.0, box[0]), max(0.0, box[1]), box[2], box[3]]
        box[2] = min(box[2], w - box[0])
        box[3] = min(box[3], h - box[1])
        if any(_iou(box, a["bbox"]) > 0.4 for a in annos):
            continue
        outline = tuple(max(0, c - 60) for c in colour)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=outline)
        else:
            draw.polygon(poly, fill=colour, outline=outline)
        annos.append({"category_id": CLASSES.index(kind) + 1, "bbox": [round(v, 2) for v in box]})
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return img, annos


def generate_split(root: Path, split: str, count: int, seed: int) -> dict:
    """Write `count` images and `annotations/instances_<split>.json` under root; return the JSON dict."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split]])
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        w, h = SIZES[int(rng.integers(len(SIZES)))]
        empty = i % 20 == 7  # a few images with no objects
        img, annos = _draw_image(rng, w, h, empty)
        ext = "png" if i % 5 == 4 else "jpg"
        file_name = f"{split}_{i:05d}.{ext}"
        path = image_dir / file_name
        if ext == "jpg":
            img.save(path, format="JPEG", quality=92)
        else:
            img.save(path, format="PNG")
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for a in annos:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": a["category_id"],
                    "bbox": a["bbox"],
                    "area": round(a["bbox"][2] * a["bbox"][3], 2),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"embedded shapes dataset ({split}), seed {seed}", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(coco, f, sort_keys=True, indent=1)
    return coco


def generate(root: str | os.PathLike, variant: str = "default", seed: int = 0) -> dict[str, dict]:
    """Generate both splits of `variant` into root; skip when a complete copy is already there."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown dataset variant {variant!r}; choose one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    root = Path(root)
    marker = root / ".complete"
    expected = f"{variant} seed={seed}"
    if marker.exists() and marker.read_text() == expected:
        return {s: json.loads((root / "annotations" / f"instances_{s}.json").read_text()) for s in ("train", "val")}
    out = {"train": generate_split(root, "train", v.train, seed), "val": generate_split(root, "val", v.val, seed)}
    marker.write_text(expected)
    return out


def main(argv: list[str] | None = None) -> None:
    from pipeline.datasets import embedded_root

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="default", choices=sorted(VARIANTS))
    parser.add_argument("--root", default=None, help="output folder (default: data/embedded[_tiny])")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else embedded_root(args.variant)
    out = generate(root, args.variant, args.seed)
    for split, coco in out.items():
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} boxes -> {root / split}")


if __name__ == "__main__":
    main()
