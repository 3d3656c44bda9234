"""Detector builders, the family table and the forward-hook tap adapter."""
from .adapter import TapAdapter, detector_kind, num_classes, num_logit_classes
from .builders import (BACKBONES, ModelConfigError, build_detector, detector_from_config, extract_state_dict,
                       load_state_dict_file)
from .families import ARCHS, FAMILIES, Family, family, family_of
from .taps import Taps

__all__ = ["ARCHS", "BACKBONES", "FAMILIES", "Family", "ModelConfigError", "Taps", "TapAdapter", "build_detector",
           "detector_from_config", "detector_kind", "extract_state_dict", "family", "family_of",
           "load_state_dict_file", "num_classes", "num_logit_classes"]
