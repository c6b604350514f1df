"""TDAD (Trident Distillation Anomaly Detection) as an anomalib plugin.

Importing this package is cheap (it runs at every interpreter start through the plugin's start-up
hook): the model, which pulls in anomalib, torch and timm, is imported on first use of
``anomalib_tdad.Tdad``.
"""

__version__ = "0.8.0"
__all__ = ["Tdad", "TdadModel", "__version__"]


def __getattr__(name: str) -> object:
    """Import the model classes lazily (PEP 562)."""
    if name in {"Tdad", "TdadModel"}:
        from anomalib_tdad.models import tdad

        return getattr(tdad, name)
    msg = f"module 'anomalib_tdad' has no attribute {name!r}"
    raise AttributeError(msg)
