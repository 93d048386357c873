"""Model architectures: layers, the ViT and ResNet image towers, the text transformer, and CLIP."""

from .clip import CLIP, MAX_LOGIT_SCALE
from .config import ModelConfig, TextConfig, VisionConfig

__all__ = ["CLIP", "MAX_LOGIT_SCALE", "ModelConfig", "TextConfig", "VisionConfig"]
