"""CNN plug-ins: attention blocks for channels-first feature maps ``[B, C, H, W]``.

Most return the same shape and drop into a ResNet/MobileNet stage (SE, ECA, CBAM, ...); ``simpool``
pools to ``[B, C]``. One file per family; each registers its classes with
:func:`visattn.nn.register_attn` when imported, and this package imports every file.
:mod:`.checks` holds the argument and input checks they share, so errors read the same everywhere.
"""

from .cbam import CBAM
from .coord import CoordinateAttention
from .eca import ECA
from .ela import ELA
from .gc import GlobalContextBlock
from .lka import LargeKernelAttention
from .polarized import PolarizedSelfAttention, SequentialPolarizedSelfAttention
from .se import SqueezeExcite
from .simpool import SimPool
from .span import SPANAttention
from .split_attn import SplitAttention
from .triplet import TripletAttention
from .ulsam import ULSAM

__all__ = [
    "CBAM",
    "CoordinateAttention",
    "ECA",
    "ELA",
    "GlobalContextBlock",
    "LargeKernelAttention",
    "PolarizedSelfAttention",
    "SPANAttention",
    "SequentialPolarizedSelfAttention",
    "SimPool",
    "SplitAttention",
    "SqueezeExcite",
    "TripletAttention",
    "ULSAM",
]
