"""Data pipeline: COCO-format datasets, transforms, loaders and a synthetic shapes set."""

from .coco import CocoDetection, config_label_map, read_label_map
from .collate import build_loader, collate_fn, set_epoch
from ..errors import DatasetError
from .synthetic import SHAPE_CLASSES, make_synthetic_dataset
from .transforms import Compose, RandomHorizontalFlip, RandomResize, build_transforms

__all__ = [
    "CocoDetection",
    "config_label_map",
    "read_label_map",
    "DatasetError",
    "build_transforms",
    "Compose",
    "RandomHorizontalFlip",
    "RandomResize",
    "collate_fn",
    "build_loader",
    "set_epoch",
    "make_synthetic_dataset",
    "SHAPE_CLASSES",
]
