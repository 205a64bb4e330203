"""Vision backbones built from :mod:`visattn.nn` on one stage builder, a registry, and checkpoint conversion.

:mod:`.backbone` is the stage builder (:class:`Backbone`: stem, :class:`Stage` s of blocks, head,
multi-scale features); each family file builds its variants on it.

``create_model("dinat_tiny", num_classes=10)``, ``list_models("nat_*")``; official checkpoints
load through :func:`load_official_checkpoint`; timm users call :func:`register_timm`.

Each family file registers its variants with ``@register_model`` (see :mod:`.registry`); importing
it here is what puts them in the registry, so a new family is one file plus one import line.
"""

import sys

from .backbone import Backbone, Stage, drop_path_rates
from .convert import convert_official_state_dict, convert_timm_state_dict, load_official_checkpoint
# Importing a family registers its variants.
from .biformer import BiFormer
from .convit import ConViT
from .cswin import CSWin
from .davit import DaViT
from .focalnet import FocalNet
from .halonet import HaloNet
from .hornet import HorNet
from .mambaout import MambaOut
from .maxvit import MaxViT
from .moat import MOAT
from .nat import NAT, NAT_CONFIGS, NATConfig, dinat_dilations
from .swin import Swin
from .van import VAN
from .registry import create_model, list_models, model_info, register_model
from .timm_hook import register_timm

__all__ = [
    "Backbone",
    "BiFormer",
    "CSWin",
    "ConViT",
    "DaViT",
    "FocalNet",
    "HaloNet",
    "HorNet",
    "MOAT",
    "MambaOut",
    "MaxViT",
    "NAT",
    "NAT_CONFIGS",
    "NATConfig",
    "Stage",
    "Swin",
    "VAN",
    "convert_official_state_dict",
    "convert_timm_state_dict",
    "create_model",
    "dinat_dilations",
    "drop_path_rates",
    "list_models",
    "load_official_checkpoint",
    "model_info",
    "register_model",
    "register_timm",
]

if "timm" in sys.modules:  # imported after timm: register now (no import cost, timm is loaded already)
    register_timm()
