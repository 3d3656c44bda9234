"""Deterministic synthetic-shapes detection dataset (real JPEGs + COCO json).

Layout written under ``out_dir``::

    images/train/train_000000.jpg ...
    images/val/val_000000.jpg ...
    annotations/train.json
    annotations/val.json

Five shape classes (category ids 1..5): circle, square, triangle, cross, ring.
The task is made non-trivial by: log-uniform object sizes from 8 px (``min_object_size``)
up to 40% of the short image side (about a quarter of the objects are < 16 px), random
colours (with a minimum RGB distance to the local background), 1-8 objects per
image, low-frequency textured + pixel-noise backgrounds, un-annotated clutter
(lines and irregular blobs, some drawn over the objects), overlapping shapes
(annotation box = the shape's full extent; an object more than 70% occluded by
later shapes is not annotated), varied aspect ratios and JPEG quality 70-95.

Everything derives from ``numpy.random.default_rng`` seeded with
``(seed, split, index)``: the same seed gives byte-identical json and images,
and train / val use disjoint RNG streams.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["make_synthetic_dataset", "SHAPE_CLASSES"]

SHAPE_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
_SPLIT_CODE = {"train": 0, "val": 1}
_MIN_SIZE = 8  # px, smallest object side (default of ``min_object_size``)
_MAX_FRAC = 0.4  # largest object side as a fraction of the short image side
_MAX_OCCLUDED = 0.7  # drop an annotation when more than this fraction is hidden
_MIN_COLOUR_DIST = 90.0  # min RGB distance between an object and its local background


def _shape_mask(cls: int, s: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (s, s) mask of shape class ``cls`` filling an s x s box."""
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    e = s - 1
    name = SHAPE_CLASSES[cls]
    if name == "circle":
        d.ellipse([0, 0, e, e], fill=255)
    elif name == "square":
        d.rectangle([0, 0, e, e], fill=255)
    elif name == "triangle":
        if rng.random() < 0.5:
            d.polygon([(0, e), (e, e), (e / 2.0, 0)], fill=255)
        else:
            d.polygon([(0, 0), (e, 0), (e / 2.0, e)], fill=255)
    elif name == "cross":
        t = max(2, int(round(s * rng.uniform(0.25, 0.4))))
        a = (s - t) // 2
        d.rectangle([a, 0, a + t - 1, e], fill=255)
        d.rectangle([0, a, e, a + t - 1], fill=255)
    elif name == "ring":
        d.ellipse([0, 0, e, e], outline=255, width=max(2, int(round(s * rng.uniform(0.12, 0.22)))))
    else:  # pragma: no cover
        raise ValueError(name)
    return np.asarray(m) > 127


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(30, 225, size=3)
    gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    amp = rng.uniform(15, 50)
    low = rng.normal(0.0, 1.0, size=(gh, gw, 3)).astype(np.float32)
    # upsample the coarse noise per channel with PIL (smooth texture)
    chans = [
        np.asarray(Image.fromarray(low[..., c]).resize((w, h), Image.BICUBIC), dtype=np.float32)
        for c in range(3)
    ]
    img = base[None, None, :] + amp * np.stack(chans, axis=-1)
    img += rng.normal(0.0, rng.uniform(3, 12), size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _random_colour(rng: np.random.Generator) -> Tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _draw_clutter(img: Image.Image, rng: np.random.Generator, n_lines: int, n_blobs: int) -> None:
    w, h = img.size
    d = ImageDraw.Draw(img)
    for _ in range(n_lines):
        x0, x1 = rng.uniform(0, w, size=2)
        y0, y1 = rng.uniform(0, h, size=2)
        d.line([(x0, y0), (x1, y1)], fill=_random_colour(rng), width=int(rng.integers(1, 4)))
    for _ in range(n_blobs):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(3, 0.12 * min(w, h))
        k = int(rng.integers(6, 12))
        ang = np.sort(rng.uniform(0, 2 * math.pi, size=k))
        rad = r * rng.uniform(0.4, 1.0, size=k)
        pts = [(float(cx + a * math.cos(t)), float(cy + a * math.sin(t))) for t, a in zip(ang, rad)]
        d.polygon(pts, fill=_random_colour(rng))


def _contrasting_colour(local_mean: np.ndarray, rng: np.random.Generator) -> Tuple[int, int, int]:
    for _ in range(30):
        c = rng.integers(0, 256, size=3)
        if np.linalg.norm(c - local_mean) >= _MIN_COLOUR_DIST:
            return tuple(int(v) for v in c)
    # fallback: push each channel away from the background
    c = np.where(local_mean < 128, 255, 0)
    return tuple(int(v) for v in c)


def _make_image(rng: np.random.Generator, image_size: int,
                min_size: int = _MIN_SIZE) -> Tuple[bytes, int, int, List[Dict[str, Any]]]:
    """Render one image. Returns (jpeg bytes, width, height, objects[{cls, bbox}])."""
    w = h = int(image_size)
    if rng.random() < 0.6:
        short = int(round(image_size * rng.uniform(0.75, 1.0)))
        if rng.random() < 0.5:
            h = short
        else:
            w = short

    canvas = _background(h, w, rng)
    pil = Image.fromarray(canvas)
    _draw_clutter(pil, rng, n_lines=int(rng.integers(1, 7)), n_blobs=int(rng.integers(0, 5)))
    canvas = np.array(pil)

    inst = np.zeros((h, w), dtype=np.int16)  # 0 = no object, k = k-th object (1-based)
    objects: List[Dict[str, Any]] = []
    n_obj = int(rng.integers(1, 9))
    max_side = max(min_size + 1, int(_MAX_FRAC * min(w, h)))
    for k in range(1, n_obj + 1):
        cls = int(rng.integers(0, len(SHAPE_CLASSES)))
        s = int(round(math.exp(rng.uniform(math.log(min_size), math.log(max_side)))))
        s = min(max(s, min_size), min(w, h))
        x0 = int(rng.integers(0, w - s + 1))
        y0 = int(rng.integers(0, h - s + 1))
        mask = _shape_mask(cls, s, rng)
        region = canvas[y0 : y0 + s, x0 : x0 + s]
        colour = _contrasting_colour(region[mask].reshape(-1, 3).mean(axis=0), rng)
        # mild shading so shapes are not perfectly flat
        shade = rng.normal(0.0, 6.0, size=(int(mask.sum()), 3))
        region[mask] = np.clip(np.asarray(colour, dtype=np.float64)[None, :] + shade, 0, 255).astype(np.uint8)
        inst[y0 : y0 + s, x0 : x0 + s][mask] = k
        ys, xs = np.nonzero(mask)
        bx0, by0 = x0 + int(xs.min()), y0 + int(ys.min())
        bx1, by1 = x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1
        objects.append(
            {"cls": cls, "bbox": [bx0, by0, bx1 - bx0, by1 - by0], "slc": (y0, x0, s), "mask": mask, "k": k}
        )

    # un-annotated thin lines on top of everything (partial clutter occlusion)
    pil = Image.fromarray(canvas)
    _draw_clutter(pil, rng, n_lines=int(rng.integers(0, 3)), n_blobs=0)
    canvas = np.asarray(pil, dtype=np.float32)
    canvas += rng.normal(0.0, rng.uniform(1.0, 5.0), size=canvas.shape)
    pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))

    kept = []
    for o in objects:
        y0, x0, s = o["slc"]
        visible = float((inst[y0 : y0 + s, x0 : x0 + s][o["mask"]] == o["k"]).mean())
        if 1.0 - visible > _MAX_OCCLUDED:
            continue
        kept.append({"cls": o["cls"], "bbox": o["bbox"]})

    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    return buf.getvalue(), w, h, kept


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _make_split(
    split: str, n: int, seed: int, image_size: int, img_dir: str, pbar, min_size: int = _MIN_SIZE
) -> Dict[str, Any]:
    images, annotations = [], []
    ann_id = 1
    for i in range(n):
        rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], i])
        jpeg, w, h, objs = _make_image(rng, image_size, min_size)
        file_name = f"{split}_{i:06d}.jpg"
        _write_atomic(os.path.join(img_dir, file_name), jpeg)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for o in objs:
            bw, bh = o["bbox"][2], o["bbox"][3]
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": o["cls"] + 1,
                    "bbox": [float(v) for v in o["bbox"]],
                    "area": float(bw * bh),
                    "iscrowd": 0,
                }
            )
            ann_id += 1
        if pbar is not None:
            pbar.update(1)
    return {
        "info": {
            "description": f"samkd synthetic shapes ({split})",
            "version": "1",
            "seed": int(seed),
            "image_size": int(image_size),
            **({} if min_size == _MIN_SIZE else {"min_object_size": int(min_size)}),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)
        ],
    }


def make_synthetic_dataset(
    out_dir,
    num_images: int,
    seed: int = 0,
    image_size: int = 256,
    val_images: Optional[int] = None,
    progress: bool = True,
    min_object_size: int = _MIN_SIZE,
) -> Dict[str, Any]:
    """Write a synthetic shapes detection dataset and return its paths and counts.

    Args:
        out_dir: output root (created if needed).
        num_images: number of training images (>= 1).
        seed: RNG seed; same seed -> byte-identical files.
        image_size: long image side in px (the short side is 75-100% of it).
        val_images: number of validation images (default ``max(1, num_images // 5)``).
        progress: show a tqdm progress bar.
        min_object_size: smallest object side in px (default 8). Objects are log-uniform between it and 40% of
            the short side, so ``8 * image_size / 128`` makes a larger image the same task as 128 px images at
            a finer resolution (the YOLO bench at 256 px: 16).

    Returns:
        dict with ``root``, ``train_ann_file``, ``train_img_dir``, ``val_ann_file``,
        ``val_img_dir`` (str paths), ``num_train_images``, ``num_val_images``,
        ``num_train_annotations``, ``num_val_annotations``, ``class_names``.
    """
    num_images = int(num_images)
    if num_images < 1:
        raise ValueError(f"make_synthetic_dataset: num_images must be >= 1, got {num_images}")
    if val_images is None:
        val_images = max(1, num_images // 5)
    val_images = int(val_images)
    if val_images < 0:
        raise ValueError(f"make_synthetic_dataset: val_images must be >= 0, got {val_images}")
    min_object_size = int(min_object_size)
    if min_object_size < 2:
        raise ValueError(f"make_synthetic_dataset: min_object_size must be >= 2, got {min_object_size}")
    if int(image_size) < 4 * min_object_size:
        raise ValueError(f"make_synthetic_dataset: image_size must be >= {4 * min_object_size} (4 x "
                         f"min_object_size), got {image_size}")

    root = os.fspath(out_dir)
    ann_dir = os.path.join(root, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    out: Dict[str, Any] = {"root": root, "class_names": list(SHAPE_CLASSES)}

    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=num_images + val_images, desc="synthetic shapes", unit="img")
    try:
        for split, n in (("train", num_images), ("val", val_images)):
            img_dir = os.path.join(root, "images", split)
            os.makedirs(img_dir, exist_ok=True)
            data = _make_split(split, n, seed, image_size, img_dir, pbar, min_object_size)
            ann_file = os.path.join(ann_dir, f"{split}.json")
            _write_atomic(ann_file, json.dumps(data, separators=(",", ":")).encode("utf-8"))
            out[f"{split}_ann_file"] = ann_file
            out[f"{split}_img_dir"] = img_dir
            out[f"num_{split}_images"] = len(data["images"])
            out[f"num_{split}_annotations"] = len(data["annotations"])
    finally:
        if pbar is not None:
            pbar.close()
    return out
