"""Anomaly detection models shipped by anomalib-tdad."""

from anomalib_tdad.registry import register_models

from .tdad import Tdad

__all__ = ["Tdad"]

# Importing Tdad imported anomalib.models; if that happened first here, the start-up hook could
# not bind Tdad yet (this module was half-initialized), so bind it now.
register_models()
