"""TDAD: Trident Distillation Anomaly Detection."""

from .lightning_model import Tdad
from .loss import TdadLoss
from .torch_model import TdadModel

__all__ = ["Tdad", "TdadLoss", "TdadModel"]
