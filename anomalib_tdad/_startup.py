"""Start-up hook that lets anomalib and timm find this plugin without patching either.

``anomalib_tdad_startup.pth`` (installed next to site-packages) calls :func:`install` at
interpreter start. It only puts a tiny finder on ``sys.meta_path``; nothing is imported until a
program imports one of the watched modules, so programs that never use anomalib or timm pay
nothing. When a watched module has finished importing, its callback runs:

- ``anomalib.models`` / ``anomalib.data``: plugins registered under the entry-point groups of the
  same name become attributes of those modules (``--model Tdad``, ``get_model("tdad")``,
  ``--data MVTec``, benchmark configs with a bare ``class_path``).
- ``timm``: offline weights shipped by installed packages are registered with timm's pretrained
  configs, so ``timm.create_model(name, pretrained=True)`` finds them with no network (only where
  timm's own are not cached; see :mod:`anomalib_tdad.weights`).

The ``.pth`` line imports this module inside ``try``/``except``: when ``anomalib_tdad`` cannot be
imported (package removed but the ``.pth`` left behind, an editable install whose checkout moved),
Python starts silently, at the cost of one failed import, instead of printing a traceback.

Without the hook (``python -S``, ``pip install --target``, frozen applications) nothing is bound,
but dotted paths still work: ``--model anomalib_tdad.Tdad``, ``--data anomalib_tdad.data.MVTec``;
a ``Tdad`` registers the offline weights itself before it builds its teacher.

This module must import nothing beyond ``sys``: it runs in every Python process of the
environment.
"""

import sys

# module -> "package.module:function" called with no arguments after the module is imported
_AFTER_IMPORT = {
    "anomalib.models": "anomalib_tdad.registry:register_models",
    "anomalib.data": "anomalib_tdad.registry:register_datamodules",
    "timm": "anomalib_tdad.weights:register_offline_weights",
}


def _run(target: str) -> None:
    """Import and call ``target``; a failure becomes a warning, never a broken import."""
    module_name, _, function = target.partition(":")
    try:
        module = __import__(module_name, fromlist=[function])
        getattr(module, function)()
    except Exception as error:  # noqa: BLE001 - a plugin must never break its host's import
        import warnings

        warnings.warn(f"anomalib-tdad: {target} failed: {error!r}", RuntimeWarning, stacklevel=2)


class _LoaderWithCallback:
    """Delegates to the real loader and runs a callback once the module is executed."""

    def __init__(self, loader: object, target: str) -> None:
        self._loader = loader
        self._target = target

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)

    def create_module(self, spec: object) -> object:
        return self._loader.create_module(spec)  # type: ignore[attr-defined]

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)  # type: ignore[attr-defined]
        _run(self._target)


class _PostImportFinder:
    """A meta-path finder that wraps the loaders of the watched modules."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> object:
        callback = _AFTER_IMPORT.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderWithCallback(spec.loader, callback)
                return spec
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent); run callbacks for modules already imported."""
    if any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _PostImportFinder())
    for module_name, target in _AFTER_IMPORT.items():
        if module_name in sys.modules:
            _run(target)
