"""The plugin bridge: entry points, the start-up hook, and every way anomalib looks up a model."""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from anomalib_tdad import _startup


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter of this environment (start-up hook active); return stdout."""
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_entry_points_are_declared() -> None:
    assert {ep.name: ep.value for ep in entry_points(group="anomalib.models")}["Tdad"] == "anomalib_tdad.models:Tdad"
    assert {ep.name: ep.value for ep in entry_points(group="anomalib.data")}["MVTec"] == "anomalib_tdad.data:MVTec"


def test_start_up_hook_costs_nothing_for_programs_without_anomalib() -> None:
    out = _fresh_python(
        "import sys; print(sorted(m for m in ('torch', 'timm', 'anomalib', 'anomalib_tdad.models', "
        "'anomalib_tdad._startup') if m in sys.modules))"
    )
    assert out == "['anomalib_tdad._startup']"


@pytest.mark.parametrize(
    "first_import",
    [
        "import anomalib.models",
        "import anomalib_tdad; anomalib_tdad.Tdad",
        "import anomalib_tdad.models.tdad.torch_model",
        "import timm",
    ],
)
def test_anomalib_finds_tdad_whatever_is_imported_first(first_import: str) -> None:
    out = _fresh_python(
        f"{first_import}\n"
        "import anomalib.models as models\n"
        "from anomalib.models import get_model, list_models\n"
        "a = type(get_model('tdad', pre_trained=False)).__name__\n"
        "b = type(get_model({'class_path': 'Tdad', 'init_args': {'pre_trained': False}})).__name__\n"
        "print(models.Tdad.__name__, a, b, 'tdad' in list_models(), 'Tdad' in models.__all__)"
    )
    assert out == "Tdad Tdad Tdad True True"


def test_mvtec_alias_is_the_mvtecad_datamodule() -> None:
    out = _fresh_python("import anomalib.data as d; print(issubclass(d.MVTec, d.MVTecAD), d.MVTec.__name__)")
    assert out == "True MVTec"


def test_a_failing_plugin_callback_warns_instead_of_breaking_the_host_import() -> None:
    with pytest.warns(RuntimeWarning, match="no_such_module"):
        _startup._run("no_such_module:register")  # noqa: SLF001


def test_install_is_idempotent() -> None:
    before = sum(isinstance(finder, _startup._PostImportFinder) for finder in sys.meta_path)  # noqa: SLF001
    _startup.install()
    _startup.install()
    assert sum(isinstance(finder, _startup._PostImportFinder) for finder in sys.meta_path) == before == 1  # noqa: SLF001
