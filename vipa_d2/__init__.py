"""vipa_d2: VIPA referring image segmentation for Detectron2.

Importing the package registers the backbones, the ``VIPA`` meta-architecture and
the built-in referring datasets (lazily: no file is read, no network is touched).
"""
from .config import ConfigError, add_vipa_config, get_vipa_cfg
from . import data  # noqa: F401  registers datasets
from . import modeling  # noqa: F401  registers backbones and the meta-architecture
from . import evaluation  # noqa: F401
from .predictor import VIPAPredictor

__all__ = ["ConfigError", "add_vipa_config", "get_vipa_cfg", "VIPAPredictor"]
__version__ = "0.1.0"
