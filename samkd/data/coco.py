"""COCO-format detection dataset for torchvision detectors.

The annotation file is parsed and validated up front, so that a bad dataset
fails at construction time with a :class:`~samkd.errors.DatasetError`
that names the file and the record/field at fault, instead of half-way
through a training run.

Label convention (torchvision): COCO category ids are mapped to contiguous
labels ``1..K`` in sorted category-id order; label ``0`` is the background, so
detectors are built with ``num_classes = K + 1``. With ``label_mode="category_id"``
the category id *is* the label (``num_classes = max id + 1``): that is the label
space of torchvision's COCO-pretrained detectors (91 classes with gaps), needed
to fine-tune or distil from them on COCO itself.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from numbers import Real
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DatasetError

__all__ = ["CocoDetection", "LABEL_MODES", "config_label_map", "read_label_map"]

# contiguous: labels 1..K in category-id order | category_id: label = COCO category id
LABEL_MODES = ("contiguous", "category_id")

# How many offending entries to list in an error / warning message.
_MAX_LISTED = 5


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _rec(kind: str, index: int, rec: Any) -> str:
    """Human-readable name of a record: ``annotation id 17`` or ``annotations[3]``."""
    if isinstance(rec, dict) and _is_int(rec.get("id")):
        return f"{kind} id {rec['id']}"
    plural = {"image": "images", "annotation": "annotations", "category": "categories"}[kind]
    return f"{plural}[{index}]"


def _require_fields(file: str, where: str, rec: Any, fields: Tuple[str, ...]) -> None:
    """A json record must be an object holding ``fields``; the error names the file, record and field."""
    if not isinstance(rec, dict):
        raise DatasetError(f"{file}: {where}: must be an object, got {type(rec).__name__}")
    for field in fields:
        if field not in rec:
            raise DatasetError(f"{file}: {where}: missing required field '{field}'")


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")  # handles L, LA, P, RGBA, CMYK, I;16 ...


# Above this many images the header check shows a progress bar (COCO train: 118k headers, some seconds).
_LARGE_SET = 2000


def _size_mismatch(info: Dict[str, Any], path: str, size: Tuple[int, int]) -> Optional[str]:
    """What is wrong when the json's ``width``/``height`` are not the file's ``size`` (None when they agree)."""
    w, h = size
    if (w, h) == (int(info["width"]), int(info["height"])):
        return None
    return f"'width'/'height' are {info['width']}x{info['height']} but {path} is {w}x{h}"


def parse_categories(file: str, categories: List[Any]) -> Dict[int, str]:
    """``{category id: name}`` of the ``categories`` list of annotation file ``file`` (checked)."""
    cats: Dict[int, str] = {}
    for i, c in enumerate(categories):
        where = _rec("category", i, c)
        _require_fields(file, where, c, ("id",))
        if not _is_int(c["id"]):
            raise DatasetError(f"{file}: {where}: field 'id' must be an integer, got {c['id']!r}")
        cid = int(c["id"])
        if cid in cats:
            raise DatasetError(f"{file}: {where}: duplicate category id {cid}")
        cname = c.get("name", str(cid))
        if not isinstance(cname, str):
            raise DatasetError(f"{file}: {where}: field 'name' must be a string, got {cname!r}")
        cats[cid] = cname
    if not cats:
        raise DatasetError(f"{file}: 'categories' is empty; at least one category is required")
    return cats


def label_maps(file: str, cats: Dict[int, str], label_mode: str) -> Tuple[Dict[int, int], List[str]]:
    """``(label_to_cat_id, class_names)`` of categories ``cats``: labels 1..K in category-id order
    (``contiguous``), or label = category id (``category_id``); ``class_names[label - 1]``."""
    sorted_ids = sorted(cats)
    if label_mode == "category_id":
        if sorted_ids[0] < 1:
            raise DatasetError(f"{file}: label_mode 'category_id' needs category ids >= 1 (0 is the "
                               f"background), got id {sorted_ids[0]}")
        # Every id up to the largest is a label (unused ones too: a pretrained head predicts them, and
        # COCOeval ignores categories that are not in the ground truth).
        labels = range(1, sorted_ids[-1] + 1)
        return {i: i for i in labels}, [cats.get(i, "") for i in labels]
    return {i + 1: cid for i, cid in enumerate(sorted_ids)}, [cats[cid] for cid in sorted_ids]


def read_label_map(ann_file, label_mode: str = "contiguous") -> Dict[str, Dict[int, Any]]:
    """``{"label_to_category_id": {label: category id}, "class_names": {label: name}}`` of a COCO annotation file,
    as :class:`CocoDetection` maps it (only its categories are read: no image is needed)."""
    file = os.fspath(ann_file)
    data = CocoDetection._read_json(file)
    if not isinstance(data.get("categories"), list):
        raise DatasetError(f"{file}: missing required top-level field 'categories' (a list)")
    to_cat, names = label_maps(file, parse_categories(file, data["categories"]), label_mode)
    return {"label_to_category_id": to_cat, "class_names": {label: names[label - 1] for label in to_cat}}


def config_label_map(data) -> Optional[Dict[str, Dict[int, Any]]]:
    """:func:`read_label_map` of a config's data block (its validation annotations, else its training ones: the
    first that exists), None when it names neither."""
    data = data.resolved()
    for ann in (data.val_ann, data.train_ann):
        if ann and os.path.isfile(ann):
            return read_label_map(ann, data.label_mode)
    return None


class CocoDetection(Dataset):
    """COCO-json detection dataset.

    Args:
        ann_file: path to a COCO-format json file (``images``, ``annotations``,
            ``categories``).
        img_dir: directory the images' ``file_name`` entries are relative to.
        transforms: optional callable ``(image, target) -> (image, target)``.
        label_mode: ``"contiguous"`` (labels ``1..K``) or ``"category_id"`` (label = category id).

    ``__getitem__(i)`` returns ``(image, target)`` where ``image`` is a float
    tensor ``(3, H, W)`` in ``[0, 1]`` and ``target`` is a dict with

    * ``boxes``: float32 ``(n, 4)`` absolute ``x1, y1, x2, y2`` (clipped to the image),
    * ``labels``: int64 ``(n,)`` contiguous labels in ``1..K``,
    * ``image_id``: python ``int`` (the COCO image id),
    * ``orig_size``: int64 tensor ``(h, w)`` of the image as stored on disk.

    ``iscrowd=1`` annotations are not part of training targets (they stay in
    :attr:`coco` for evaluation). Boxes entirely outside the image or with
    zero/negative area after clipping are skipped with a single warning; their
    count is :attr:`num_skipped_boxes`. Images without annotations are kept.

    Attributes:
        image_ids: COCO image ids in dataset order.
        label_to_cat_id / cat_id_to_label: label <-> category id maps.
        class_names: category names, ``class_names[label - 1]`` (``""`` for unused ids in
            ``category_id`` mode).
        num_classes: ``K + 1`` (includes background); ``max id + 1`` in ``category_id`` mode.
        num_skipped_boxes: annotations dropped as degenerate.
        num_clipped_boxes: annotations whose box was clipped to the image.
    """

    LABEL_MODES = LABEL_MODES

    def __init__(self, ann_file, img_dir, transforms: Optional[Callable] = None, label_mode: str = "contiguous"):
        super().__init__()
        if label_mode not in self.LABEL_MODES:
            raise ValueError(f"label_mode must be one of {', '.join(self.LABEL_MODES)}, got {label_mode!r}")
        self.label_mode = label_mode
        self.ann_file = os.fspath(ann_file)
        self.img_dir = os.fspath(img_dir)
        self.transforms = transforms
        self._coco = None

        data = self._read_json(self.ann_file)
        self._dataset = data
        self._parse(data)

    # ------------------------------------------------------------------ parsing
    @staticmethod
    def _read_json(path: str) -> Dict[str, Any]:
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DatasetError(f"{path}: annotation file not found") from None
        except IsADirectoryError:
            raise DatasetError(f"{path}: annotation path is a directory, expected a json file") from None
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
            ) from None
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}: not a UTF-8 text file ({e.reason})") from None
        if not isinstance(data, dict):
            raise DatasetError(
                f"{path}: top level must be a JSON object with 'images', 'annotations' and "
                f"'categories', got {type(data).__name__}"
            )
        return data

    def _parse(self, data: Dict[str, Any]) -> None:
        name = self.ann_file
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(f"{name}: missing required top-level field '{key}'")
            if not isinstance(data[key], list):
                raise DatasetError(
                    f"{name}: top-level field '{key}' must be a list, got {type(data[key]).__name__}"
                )
        cats = self._parse_categories(data["categories"])
        images = self._parse_images(data["images"])
        per_image = self._parse_annotations(data["annotations"], cats, images)
        self._check_image_files(images)
        self._images = images
        self._targets: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        for iid, (boxes, labels) in per_image.items():
            self._targets[iid] = (
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.int64).reshape(-1),
            )

    def _parse_categories(self, categories: List[Any]) -> Dict[int, str]:
        """``{category id: name}``; sets the label maps, ``class_names`` and ``num_classes``."""
        cats = parse_categories(self.ann_file, categories)
        self.label_to_cat_id, self.class_names = label_maps(self.ann_file, cats, self.label_mode)
        self.cat_id_to_label: Dict[int, int] = {cid: lab for lab, cid in self.label_to_cat_id.items() if cid in cats}
        self.num_classes: int = len(self.class_names) + 1
        return cats

    def _parse_images(self, records: List[Any]) -> Dict[int, Dict[str, Any]]:
        """``{image id: record}``; sets ``image_ids`` (file order)."""
        name = self.ann_file
        if not records:
            raise DatasetError(f"{name}: dataset is empty ('images' is an empty list)")
        images: Dict[int, Dict[str, Any]] = {}
        for i, im in enumerate(records):
            where = _rec("image", i, im)
            _require_fields(name, where, im, ("id", "file_name", "width", "height"))
            if not _is_int(im["id"]):
                raise DatasetError(f"{name}: {where}: field 'id' must be an integer, got {im['id']!r}")
            if not isinstance(im["file_name"], str) or not im["file_name"]:
                raise DatasetError(
                    f"{name}: {where}: field 'file_name' must be a non-empty string, got {im['file_name']!r}"
                )
            for field in ("width", "height"):
                v = im[field]
                if not _is_number(v) or v != int(v) or int(v) <= 0:
                    raise DatasetError(f"{name}: {where}: field '{field}' must be a positive integer, got {v!r}")
            iid = int(im["id"])
            if iid in images:
                raise DatasetError(f"{name}: {where}: duplicate image id {iid}")
            images[iid] = im
        self.image_ids: List[int] = [int(im["id"]) for im in records]
        return images

    def _checked_annotation(self, i: int, a: Any, cats: Dict[int, str], images: Dict[int, Any],
                            seen: set) -> Optional[Tuple[int, int, List[float]]]:
        """``(image id, category id, [x, y, w, h])`` of a valid annotation, ``None`` for a crowd region."""
        name, where = self.ann_file, _rec("annotation", i, a)
        _require_fields(name, where, a, ("id", "image_id", "category_id", "bbox"))
        for field in ("id", "image_id", "category_id"):
            if not _is_int(a[field]):
                raise DatasetError(f"{name}: {where}: field '{field}' must be an integer, got {a[field]!r}")
        aid = int(a["id"])
        if aid in seen:
            raise DatasetError(f"{name}: {where}: duplicate annotation id {aid}")
        seen.add(aid)
        cid, iid, bbox = int(a["category_id"]), int(a["image_id"]), a["bbox"]
        if cid not in cats:
            raise DatasetError(f"{name}: {where}: category_id {cid} is not in 'categories'")
        if iid not in images:
            raise DatasetError(f"{name}: {where}: image_id {iid} is not in 'images'")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(_is_number(v) and math.isfinite(v) for v in bbox)):
            raise DatasetError(
                f"{name}: {where}: field 'bbox' must be a list of 4 finite numbers [x, y, w, h], got {bbox!r}")
        crowd = a.get("iscrowd", 0)
        if not (_is_number(crowd) and crowd in (0, 1)):
            raise DatasetError(f"{name}: {where}: field 'iscrowd' must be 0 or 1, got {crowd!r}")
        return None if crowd == 1 else (iid, cid, [float(v) for v in bbox])

    def _parse_annotations(self, records: List[Any], cats: Dict[int, str], images: Dict[int, Any]
                           ) -> Dict[int, Tuple[List[List[float]], List[int]]]:
        """``{image id: (boxes xyxy clipped to the image, labels)}``; crowd regions and empty boxes left out."""
        per_image: Dict[int, Tuple[List[List[float]], List[int]]] = {iid: ([], []) for iid in images}
        seen: set = set()
        skipped: List[str] = []
        clipped = 0
        for i, a in enumerate(records):
            checked = self._checked_annotation(i, a, cats, images, seen)
            if checked is None:
                continue  # ignored for training targets; kept in self.coco for evaluation
            iid, cid, (x, y, w, h) = checked
            img = images[iid]
            W, H = float(img["width"]), float(img["height"])
            x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(W, x + w), min(H, y + h)
            if x2 <= x1 or y2 <= y1:
                skipped.append(str(int(a["id"])))
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                clipped += 1
            boxes, labels = per_image[iid]
            boxes.append([x1, y1, x2, y2])
            labels.append(self.cat_id_to_label[cid])
        self.num_skipped_boxes: int = len(skipped)
        self.num_clipped_boxes: int = clipped
        self._warn_unusable(skipped, per_image)
        return per_image

    def _warn_unusable(self, skipped: List[str], per_image: Dict[int, Tuple[list, list]]) -> None:
        name = self.ann_file
        if skipped:
            listed = ", ".join(skipped[:_MAX_LISTED]) + (", ..." if len(skipped) > _MAX_LISTED else "")
            warnings.warn(
                f"{name}: skipped {len(skipped)} annotation(s) whose box lies entirely outside the image "
                f"or has zero/negative area after clipping (annotation ids {listed})",
                stacklevel=5,
            )
        if not any(labels for _, labels in per_image.values()):
            # Legal (background-only images are kept), but training on it teaches a detector nothing.
            warnings.warn(f"{name}: no usable annotations in any of its {len(per_image)} image(s): a detector "
                          "trained on it only learns background", stacklevel=5)

    def _check_image_files(self, images: Dict[int, Dict[str, Any]]) -> None:
        """Every image file must exist now, so that nothing half-runs."""
        missing: List[str] = []
        for iid in self.image_ids:
            path = os.path.join(self.img_dir, images[iid]["file_name"])
            if not os.path.isfile(path):
                missing.append(f"{path} (image id {iid})")
        if missing:
            listed = "; ".join(missing[:_MAX_LISTED]) + ("; ..." if len(missing) > _MAX_LISTED else "")
            raise DatasetError(
                f"{self.ann_file}: {len(missing)} of {len(self.image_ids)} image file(s) missing under "
                f"'{self.img_dir}': {listed}"
            )

    def check_images(self, progress: bool = False) -> None:
        """Open every image's header (no decode): each file must be an image PIL reads, of the size its record
        gives. Raises a :class:`DatasetError` naming the first bad file, its image id and the field at fault.

        Cheap (the header only: about 0.1 ms an image), so a training run checks its whole data set before it
        writes anything; a file whose pixel data is cut short or corrupt is only found when it is decoded.
        ``progress`` shows a bar on sets of more than ``_LARGE_SET`` images.
        """
        from tqdm.auto import tqdm

        show = progress and len(self.image_ids) > _LARGE_SET
        for iid in tqdm(self.image_ids, desc=f"check {os.path.basename(self.ann_file)} images", unit="img",
                        disable=not show, dynamic_ncols=True):
            info = self._images[iid]
            path = os.path.join(self.img_dir, info["file_name"])
            try:
                with Image.open(path) as im:
                    size = im.size
            except (OSError, Image.DecompressionBombError) as e:  # not an image, unreadable, a decompression bomb
                raise DatasetError(f"{self.ann_file}: image id {iid}: cannot read image {path}: {e}") from None
            wrong = _size_mismatch(info, path, size)
            if wrong:
                raise DatasetError(f"{self.ann_file}: image id {iid}: {wrong}")

    # ---------------------------------------------------------------- accessors
    @property
    def coco(self):
        """Ground truth as a ``faster_coco_eval.COCO`` object (pycocotools API), for evaluation.

        Built lazily from a copy of the parsed json (so evaluation cannot mutate
        the dataset); missing ``area`` (-> ``w*h``) and ``iscrowd`` (-> 0) fields
        are filled in because COCOeval needs them. Annotations are kept as in the
        file (not clipped, crowd regions included), as in standard COCO evaluation.
        """
        if self._coco is None:
            from faster_coco_eval import COCO

            data = copy.deepcopy(self._dataset)
            for a in data["annotations"]:
                a.setdefault("iscrowd", 0)
                if "area" not in a:
                    a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
            c = COCO()
            c.dataset = data
            c.createIndex()
            self._coco = c
        return self._coco

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> Dict[str, Any]:
        """The json record of image ``index`` (``id``, ``file_name``, ``width``, ``height``, ...)."""
        return self._images[self.image_ids[index]]

    def image_path(self, index: int) -> str:
        return os.path.join(self.img_dir, self.image_info(index)["file_name"])

    def get_target(self, index: int) -> Dict[str, Any]:
        """Target dict of image ``index`` without loading the image (no transforms)."""
        iid = self.image_ids[index]
        info = self._images[iid]
        boxes, labels = self._targets[iid]
        return {
            "boxes": boxes.clone(),
            "labels": labels.clone(),
            "image_id": iid,
            "orig_size": torch.tensor([int(info["height"]), int(info["width"])], dtype=torch.int64),
        }

    def __getitem__(self, index: int):
        info = self.image_info(index)
        path = self.image_path(index)
        try:
            pil = _load_rgb(path)
        except FileNotFoundError:
            raise DatasetError(f"{self.ann_file}: image id {info['id']}: file not found: {path}") from None
        except (OSError, Image.DecompressionBombError) as e:
            raise DatasetError(
                f"{self.ann_file}: image id {info['id']}: cannot read image {path}: {e}"
            ) from None
        wrong = _size_mismatch(info, path, pil.size)
        if wrong:
            raise DatasetError(f"{self.ann_file}: image id {info['id']}: {wrong}")
        arr = np.asarray(pil, dtype=np.uint8)
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        target = self.get_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ann_file={self.ann_file!r}, img_dir={self.img_dir!r}, "
            f"images={len(self)}, classes={self.num_classes - 1})"
        )
