from .timm_backbone import VIPATimmBackbone
from .weights import load_backbone_weights, convert_efficientnet_pytorch

__all__ = ["VIPATimmBackbone", "load_backbone_weights", "convert_efficientnet_pytorch"]
