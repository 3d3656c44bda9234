"""Forward-hook adapter: FPN features, classification logits and resized targets of a detector.

In train mode torchvision detectors return only their losses, so the tensors that distillation needs are
taken with forward hooks on the modules the detector's family names (:meth:`Family.tap_points`):

* the transform  -> the batched, normalised, resized ``ImageList`` and the resized targets;
* the backbone   -> the FPN ``OrderedDict`` (one map per level);
* the logit modules -> the dense class logits, level by level (FCOS, RetinaNet: ``cls_logits``, called once per
  level; Faster R-CNN: the RPN head, once for all levels);
* two-stage only: the RoI pooler / box predictor -> sampled proposals and RoI logits.

The teacher never runs its own transform: :meth:`TapAdapter.run_on_batch` feeds it the student's transformed
batch so both see exactly the same pixels.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch.nn as nn
from torch import Tensor

from .families import family_of
from .taps import Taps


class TapAdapter:
    """Collects :class:`Taps` from a detector's forward through hooks.

    Usage::

        taps = TapAdapter(model)
        losses = model(images, targets)   # normal torchvision call
        t = taps.collect()                # features, logits, resized targets of that call
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model)
        self.num_anchors, self.num_logit_classes = self.family.logit_layout(model)
        self._handles = []
        self._reset()
        points = self.family.tap_points(model)
        self._logits_of = points.logits_of
        hooks = [(points.transform, self._on_transform), (points.backbone, self._on_backbone),
                 *((module, self._on_logits) for module in points.logit_modules),
                 (points.roi_pool, self._on_roi_pool), (points.box_predictor, self._on_box_predictor)]
        for module, on_output in hooks:
            if module is not None:
                self._handles.append(module.register_forward_hook(self._hook(on_output)))

    @staticmethod
    def _hook(fn):
        return lambda module, args, output: fn(args, output)

    def _reset(self) -> None:
        self._images = None
        self._targets: list = []
        self._features: Optional[OrderedDict] = None
        self._cls: list[Tensor] = []
        self._proposals = None
        self._roi_logits = None
        self._batch = None

    def _on_transform(self, args, output) -> None:
        self._reset()  # the transform is the first step of every forward
        self._images, targets = output
        self._targets = list(targets) if targets is not None else []

    def _on_backbone(self, args, output) -> None:
        self._features = output
        self._cls = []

    def _on_logits(self, args, output) -> None:
        self._cls.extend(self._logits_of(output))

    def _on_roi_pool(self, args, output) -> None:
        self._proposals = args[1]

    def _on_box_predictor(self, args, output) -> None:
        self._roi_logits = output[0]

    def collect(self) -> Taps:
        """The taps of the last forward (raises if no forward ran since the adapter was attached)."""
        if self._features is None:
            raise RuntimeError("no forward pass was recorded: call the detector before collect()")
        feats = list(self._features.values())
        batch = self._images.tensors if self._images is not None else self._batch
        batch_shape = tuple(batch.shape[-2:])
        sizes = list(self._images.image_sizes) if self._images is not None else self._image_sizes
        return Taps(
            features=feats,
            cls_logits=list(self._cls),
            num_anchors=self.num_anchors,
            num_logit_classes=self.num_logit_classes,
            targets=self._targets,
            image_sizes=[tuple(s) for s in sizes],
            batch_shape=batch_shape,
            strides=[batch_shape[0] // f.shape[-2] if f.shape[-2] else 0 for f in feats],
            level_names=list(self._features.keys()),
            roi_logits=self._roi_logits,
            proposals=self._proposals,
            batch=batch,
        )

    def run_on_batch(self, batch: Tensor, image_sizes: list[tuple[int, int]], targets: Optional[list] = None,
                     proposals: Optional[list[Tensor]] = None) -> Taps:
        """Run backbone and classification head on an already transformed batch (the teacher's path).

        For Faster R-CNN, ``proposals`` (the student's sampled proposals) are classified by this model's
        box head so that teacher and student RoI logits describe the same boxes.
        """
        self._reset()
        self._batch = batch
        self._image_sizes = list(image_sizes)
        self._targets = list(targets or [])
        features = self.model.backbone(batch)
        self.family.run_heads(self.model, features, self._image_sizes, proposals)
        return self.collect()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
