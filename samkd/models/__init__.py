"""Detector builders and the forward-hook tap adapter."""
from .adapter import TapAdapter, detector_kind, num_classes, num_logit_classes
from .builders import ARCHS, BACKBONES, ModelConfigError, build_detector, extract_state_dict, load_state_dict_file
from .taps import Taps

__all__ = ["ARCHS", "BACKBONES", "ModelConfigError", "Taps", "TapAdapter", "build_detector", "detector_kind",
           "extract_state_dict", "load_state_dict_file", "num_classes", "num_logit_classes"]
