"""The plugin bridge: the start-up hook, its guard, and every way anomalib looks up a model."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import anomalib_tdad
from anomalib_tdad import _startup

PACKAGE_DIR = Path(anomalib_tdad.__file__).parent
PTH = PACKAGE_DIR / "anomalib_tdad_startup.pth"
HOOK_INSTALLED = "any(type(finder).__name__ == '_PostImportFinder' for finder in sys.meta_path)"


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter of this environment (start-up hook active); return stdout."""
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def _python_with_site_dir(site_dir: Path, *, package_on_path: bool) -> subprocess.CompletedProcess:
    """Start Python on ``site_dir`` as its only site folder, processed by ``site`` as at start-up.

    ``-I -S`` keep this environment's site-packages (where the editable install makes ``anomalib_tdad``
    importable), ``PYTHON*`` variables and the working folder off ``sys.path``; ``site.addsitedir`` then
    runs the ``.pth`` files of ``site_dir`` with the same code as at start-up, printing to stderr as it would.
    """
    path = f"sys.path.insert(0, {str(PACKAGE_DIR.parent)!r}); " if package_on_path else ""
    code = f"import site, sys; {path}site.addsitedir({str(site_dir)!r}); print({HOOK_INSTALLED})"
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], cwd=site_dir, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("leftover", ["uninstalled", "empty package folder", "moved editable checkout"])
def test_pth_left_behind_without_the_package_starts_python_silently(tmp_path: Path, leftover: str) -> None:
    """An uninstall that leaves the ``.pth`` behind, or a moved editable checkout, must not print a traceback."""
    (tmp_path / PTH.name).write_text(PTH.read_text())
    if leftover == "empty package folder":  # imports as a namespace package that has no ``_startup``
        (tmp_path / "anomalib_tdad").mkdir()
    elif leftover == "moved editable checkout":  # the editable install's path entry names a folder now gone
        (tmp_path / "_editable_impl_anomalib_tdad.pth").write_text(str(tmp_path / "moved-away"))
    result = _python_with_site_dir(tmp_path, package_on_path=False)
    assert (result.returncode, result.stderr, result.stdout.strip()) == (0, "", "False")


def test_pth_installs_the_hook_when_the_package_is_importable(tmp_path: Path) -> None:
    (tmp_path / PTH.name).write_text(PTH.read_text())
    result = _python_with_site_dir(tmp_path, package_on_path=True)
    assert (result.returncode, result.stderr, result.stdout.strip()) == (0, "", "True")


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
    """``--data MVTec`` resolves through this attribute of ``anomalib.data`` (the CLI run is in test_cli.py)."""
    out = _fresh_python("import anomalib.data as d; print(issubclass(d.MVTec, d.MVTecAD), d.MVTec.__name__)")
    assert out == "True MVTec"


def test_dotted_paths_work_without_the_start_up_hook(tmp_path: Path) -> None:
    """The documented fallback where no ``.pth`` runs (``python -S``, ``pip install --target``, frozen apps).

    anomalib's CLI parses and instantiates ``--model anomalib_tdad.Tdad --data anomalib_tdad.data.MVTec`` with
    the hook absent, and the teacher still gets the offline Lite0 weights (``Tdad`` registers them itself).
    """
    code = (
        "import sys, timm\n"
        "from anomalib.cli.cli import AnomalibCLI\n"
        "from safetensors.torch import load_file\n"
        "cli = AnomalibCLI(['train', '--model', 'anomalib_tdad.Tdad', '--data', 'anomalib_tdad.data.MVTec',"
        " '--data.root', 'nowhere'], run=False)\n"
        "stem = cli.model.model.teacher.feature_extractor.conv_stem.weight\n"
        "offline = load_file(timm.models.get_pretrained_cfg('tf_efficientnet_lite0.in1k').file)['conv_stem.weight']\n"
        f"print({HOOK_INSTALLED}, type(cli.model).__name__, type(cli.datamodule).__name__,"
        " bool((stem == offline).all()))\n"
    )
    env = {
        **os.environ,
        # site-packages and the checkout as plain path entries: no .pth file of either is processed
        "PYTHONPATH": os.pathsep.join([sysconfig.get_paths()["purelib"], str(PACKAGE_DIR.parent)]),
        "PYTHONWARNINGS": "ignore",
        "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache"),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "Tdad", "MVTec", "True"]


def test_a_failing_plugin_callback_warns_instead_of_breaking_the_host_import() -> None:
    with pytest.warns(RuntimeWarning, match="no_such_module"):
        _startup._run("no_such_module:register")  # noqa: SLF001


def test_install_is_idempotent() -> None:
    before = sum(isinstance(finder, _startup._PostImportFinder) for finder in sys.meta_path)  # noqa: SLF001
    _startup.install()
    _startup.install()
    assert sum(isinstance(finder, _startup._PostImportFinder) for finder in sys.meta_path) == before == 1  # noqa: SLF001
