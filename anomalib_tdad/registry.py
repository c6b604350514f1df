"""Entry-point bridge: expose installed anomalib plugins where anomalib looks for classes.

anomalib 2.7 reads no entry points. Its CLI resolves ``--model Tdad`` among imported
``AnomalibModule`` subclasses, ``get_model("tdad")`` among direct subclasses, and benchmark
configs with a bare ``class_path`` among attributes of :mod:`anomalib.models`. Loading every
plugin registered under the group ``anomalib.models`` (or ``anomalib.data``) and binding it as an
attribute of that module satisfies all three. The start-up hook calls these functions right after
anomalib imports the module; calling them again is harmless. A plugin module whose own import is
what pulled in anomalib is skipped then, and calls :func:`register_models` itself when complete.
Where the hook does not run (``python -S``, ``pip install --target``, frozen applications), the
dotted paths ``anomalib_tdad.Tdad`` and ``anomalib_tdad.data.MVTec`` work with anomalib's CLI.
"""

import logging
import sys
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

MODEL_GROUP = "anomalib.models"
DATA_GROUP = "anomalib.data"


def _register(group: str) -> list[str]:
    """Bind each entry point of ``group`` as an attribute of the module named ``group``."""
    namespace = sys.modules[group]
    registered = []
    for entry_point in entry_points(group=group):
        existing = getattr(namespace, entry_point.name, None)
        if existing is not None and getattr(existing, "__module__", "").startswith("anomalib."):
            logger.warning("Plugin %s not registered: anomalib already has %s.", entry_point.value, entry_point.name)
            continue
        module = sys.modules.get(entry_point.module)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
            # The plugin's own import pulled in anomalib: bind it if it is defined already,
            # otherwise it calls this function itself once its module is complete.
            plugin = getattr(module, entry_point.attr, None)
            if plugin is None:
                continue
        else:
            try:
                plugin = entry_point.load()
            except Exception:
                logger.exception("Could not load the anomalib plugin %s = %s", entry_point.name, entry_point.value)
                continue
        setattr(namespace, entry_point.name, plugin)
        exported = getattr(namespace, "__all__", None)
        if isinstance(exported, list) and entry_point.name not in exported:
            exported.append(entry_point.name)
        registered.append(entry_point.name)
    return registered


def register_models() -> list[str]:
    """Register the model plugins (group ``anomalib.models``); returns their names."""
    import anomalib.models  # noqa: F401 - make sure the namespace exists when called directly

    return _register(MODEL_GROUP)


def register_datamodules() -> list[str]:
    """Register the datamodule plugins (group ``anomalib.data``); returns their names."""
    import anomalib.data  # noqa: F401

    return _register(DATA_GROUP)
