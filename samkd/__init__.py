"""samkd: knowledge distillation for torchvision object detectors (SAMKD, MGD, FGD, FitNet, logit KD)."""
__version__ = "0.1.0"
