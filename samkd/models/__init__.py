"""Detector families (the table), backbones, builders, build recipes and the forward-hook tap adapter."""
from ..errors import ModelConfigError
from .adapter import TapAdapter
from .backbones import BACKBONES
from .builders import build_detector, detector_from_config, extract_state_dict, load_state_dict_file, recipe_options
from .families import ARCHS, FAMILIES, Family, TapPoints, family, family_of
from .recipe import Recipe
from .taps import Taps

__all__ = ["ARCHS", "BACKBONES", "FAMILIES", "Family", "ModelConfigError", "Recipe", "TapAdapter", "TapPoints", "Taps",
           "build_detector", "detector_from_config", "extract_state_dict", "family", "family_of",
           "load_state_dict_file", "recipe_options"]
