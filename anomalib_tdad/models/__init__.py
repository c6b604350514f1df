"""Anomaly detection models shipped by anomalib-tdad."""

from .tdad import Tdad

__all__ = ["Tdad"]
