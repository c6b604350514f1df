"""Smoke runs of the benchmark harness and scripts in ``benchmarks/``: tiny generated datasets, one epoch, one seed.

The harness (``benchmark.py``) runs in-process on a three-model grid, one job of which fails, and is checked for
its table, summary, report, plots, exit code and for leaving anomalib's classes as they were; ``speed.py`` runs
as a subprocess. The numbers mean nothing at this size. The benchmark configs are checked without training.
"""

import importlib
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from anomalib.data import ImageBatch
from anomalib.metrics import AUPRO, AUROC
from anomalib.post_processing import PostProcessor
from conftest import run_command, torch_threads
from sklearn.metrics import roc_auc_score

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RD_LABEL = "RD (TDAD λs=λd=0, same teacher)"
MODEL_LABELS = ["TDAD", RD_LABEL, "PatchCore", "STFPM", "PaDiM"]
METRICS = ["image AUROC", "pixel AUROC", "PRO"]
TYPE_PREFIXES = ("pixel AUROC · ", "PRO · ")
MVTEC_CATEGORIES = {
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
}  # fmt: skip


def run_script(script: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` with this interpreter (one thread unless OMP_NUM_THREADS says otherwise)."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    return run_command(sys.executable, str(BENCHMARKS / script), *args, cwd=cwd, threads=threads, check=check)


@pytest.fixture(scope="module")
def common() -> Iterator[ModuleType]:
    """``benchmarks/common.py``, imported by name as the scripts import it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("common")


def assert_scores(frame: pd.DataFrame, columns: list[str]) -> None:
    """Every value of ``columns`` is a finite number in [0, 1]."""
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        assert values.between(0, 1).all(), f"{column}: {values.tolist()}"


def assert_png(path: Path) -> None:
    """``path`` is a PNG image."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def assert_report(path: Path, labels: list[str]) -> None:
    """The Markdown report names every label and says how it was made."""
    text = path.read_text(encoding="utf-8")
    for needle in [*labels, "Command:", "Git commit:", "Device:", "torch threads"]:
        assert needle in text, needle


@pytest.fixture(scope="module")
def harness() -> Iterator[ModuleType]:
    """``benchmarks/benchmark.py``, imported by name (it imports ``common`` beside it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("benchmark")


BROKEN = {"class_path": "Padim", "label": "broken", "init_args": {"no_such_argument": 1}}


def tiny_config(root: Path, models: list[dict], path: Path) -> Path:
    """A one-seed, one-epoch benchmark config over ``models`` on the tiny ``brick`` set, written to ``path``."""
    data = {"root": str(root), "category": "brick", "train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0}
    config = {
        "accelerator": "cpu",
        "trainer": {"max_epochs": 1},
        "benchmark": {"seed": 0, "model": {"grid": models}, "data": {"class_path": "MVTecAD", "init_args": data}},
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def anomalib_classes() -> dict[type, dict]:
    """The namespaces of the anomalib classes (and the plugin's model) a benchmark run touches."""
    from anomalib.data import AnomalibDataModule, MVTecAD
    from anomalib.engine import Engine
    from anomalib.metrics import AUPRO, AnomalibMetric, Evaluator
    from anomalib.models import AnomalibModule, Padim, Patchcore
    from anomalib.pipelines.benchmark.generator import BenchmarkJobGenerator
    from anomalib.pipelines.benchmark.job import BenchmarkJob

    from anomalib_tdad import Tdad

    classes = [PostProcessor, AnomalibModule, Engine, Evaluator, AUROC, AUPRO, AnomalibMetric, AnomalibDataModule]
    classes += [MVTecAD, Patchcore, Padim, Tdad, BenchmarkJob, BenchmarkJobGenerator]
    return {cls: dict(vars(cls)) for cls in classes}


@dataclass
class HarnessRun:
    """One in-process harness run on the tiny set: its exit code, output folder and anomalib before/after."""

    code: int
    output: Path
    before: dict[type, dict]
    after: dict[type, dict]


@pytest.fixture(scope="module")
def harness_run(harness: ModuleType, tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> HarnessRun:
    """TDAD and PatchCore (1 epoch, 64 px) plus an entry with an argument Padim does not take."""
    folder = tmp_path_factory.mktemp("harness")
    patchcore = {
        "backbone": "tf_efficientnet_lite0",
        "layers": ["blocks.2", "blocks.4"],
        "coreset_sampling_ratio": 0.05,
    }
    models = [{"class_path": "Tdad"}, {"class_path": "Patchcore", "init_args": patchcore}, BROKEN]
    config = tiny_config(tiny_root, models, folder / "tiny.yaml")
    before = anomalib_classes()
    with torch_threads(int(os.environ.get("OMP_NUM_THREADS", "2"))):
        args = ["--config", str(config), "--image-size", "64", "--heatmaps", "2", "--output", str(folder / "out")]
        args += ["--openvino", "f32", "int8_ptq"]
        code = harness.main(args)
    return HarnessRun(code, folder / "out", before, anomalib_classes())


def test_harness_writes_a_row_per_job_with_pro_and_per_type_auroc(harness_run: HarnessRun, tiny_root: Path) -> None:
    results = pd.read_csv(harness_run.output / "results.csv")
    assert results.model.tolist() == ["TDAD", "PatchCore", "broken"]
    assert results.status.tolist() == ["ok", "ok", "failed"]
    assert (results.dataset == "MVTecAD/brick").all() and (results.seed == 0).all()
    done = results[results.status == "ok"]
    assert done.error.isna().all() and (done.epochs == 1).all() and (done.fit_s > 0).all()
    assert_scores(done, METRICS)
    defect_types = sorted(path.name for path in (tiny_root / "brick" / "test").iterdir() if path.name != "good")
    for prefix in TYPE_PREFIXES:
        by_type = [column.removeprefix(prefix) for column in results.columns if column.startswith(prefix)]
        assert by_type == defect_types, prefix
        assert_scores(done, [prefix + kind for kind in defect_types])
    assert results.loc[2, "model.class_path"] == "Padim"  # the job's flat config, as anomalib's rows have it
    summary = pd.read_csv(harness_run.output / "summary.csv")
    assert summary.model.tolist() == ["TDAD", "PatchCore"] and (summary.runs == 1).all()
    as_run = yaml.safe_load((harness_run.output / "config.yaml").read_text(encoding="utf-8"))
    assert [entry.get("label") for entry in as_run["benchmark"]["model"]["grid"]] == [None, None, "broken"]


def test_harness_scores_the_openvino_exports_as_the_torch_model(harness_run: HarnessRun) -> None:
    """``--openvino f32 int8_ptq``: the f32 IR scores the test set as the torch model does (same maps up to float
    rounding); the INT8 IR gets its own scores and their change against the f32 IR."""
    results = pd.read_csv(harness_run.output / "results.csv").set_index("model")
    summary = pd.read_csv(harness_run.output / "summary.csv").set_index("model")
    done = results[results.status == "ok"]
    assert set(done.index) == {"TDAD", "PatchCore"}
    for metric in METRICS:
        f32, int8 = f"OpenVINO f32 · {metric}", f"OpenVINO INT8 (int8_ptq) · {metric}"
        assert_scores(done, [f32, int8])
        assert (done[f32] - done[metric]).abs().max() <= 1e-3, metric
        change = summary.loc[list(done.index), f"OpenVINO INT8 (int8_ptq) change · {metric}_mean"]
        pd.testing.assert_series_equal(change, done[int8] - done[f32], check_names=False)
    report = (harness_run.output / "report.md").read_text(encoding="utf-8")
    assert "## Exported to OpenVINO" in report


def test_harness_merges_runs_into_one_report(harness: ModuleType, harness_run: HarnessRun, tmp_path: Path) -> None:
    """``--merge``: two runs (here one run and a copy with another seed) reported as one, mean ± std over both, each
    run named with its config; a job finished in two runs is refused, as are a folder without results and runs
    that differ in epochs, model settings or image limits; a failed job's finished rerun replaces it."""
    results = pd.read_csv(harness_run.output / "results.csv")
    other = tmp_path / "seed1"
    other.mkdir()
    shifted = results.assign(seed=1, **{"image AUROC": results["image AUROC"] - 0.1})
    shifted.to_csv(other / "results.csv", index=False)
    output = tmp_path / "merged"
    assert harness.main(["--merge", str(harness_run.output), str(other), "--output", str(output)]) == 0
    summary = pd.read_csv(output / "summary.csv").set_index("model")
    merged = pd.read_csv(output / "results.csv")
    assert len(merged) == 2 * len(results) and sorted(set(merged.seed)) == [0, 1]
    tdad = results.set_index("model").loc["TDAD"]
    assert summary.loc["TDAD", "runs"] == 2
    assert summary.loc["TDAD", "image AUROC_mean"] == pytest.approx(tdad["image AUROC"] - 0.05)
    assert summary.loc["TDAD", "pixel AUROC_mean"] == pytest.approx(tdad["pixel AUROC"])
    report = (output / "report.md").read_text(encoding="utf-8")
    assert f"Merged from 2 runs: `{harness_run.output}` (config `" in report and f"`{other}`." in report
    assert harness.main(["--merge", str(harness_run.output), str(harness_run.output), "--output", str(output)]) == 2
    assert harness.main(["--merge", str(tmp_path / "nothing"), "--output", str(output)]) == 2
    assert harness.main(["--output", str(output)]) == 2  # neither --config nor --merge

    # The broken entry failed in the first run; a rerun that finished it merges, its row replacing the failure.
    broken = results[results.status != "ok"]
    assert len(broken) == 1
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    broken.assign(status="ok", error=float("nan"), **{"image AUROC": 0.5}).to_csv(rerun / "results.csv", index=False)
    assert harness.main(["--merge", str(harness_run.output), str(rerun), "--output", str(output)]) == 0
    merged = pd.read_csv(output / "results.csv")
    assert len(merged) == len(results) and set(merged.status) == {"ok"}
    # Runs that differ in a model's epochs or in their image limits are refused.
    shifted.assign(epochs=shifted.epochs + 1).to_csv(other / "results.csv", index=False)
    assert harness.main(["--merge", str(harness_run.output), str(other), "--output", str(output)]) == 2
    shifted.assign(**{"model.init_args.mask_patch_size": 32}).to_csv(other / "results.csv", index=False)
    assert harness.main(["--merge", str(harness_run.output), str(other), "--output", str(output)]) == 2  # --init-arg
    shifted.to_csv(other / "results.csv", index=False)
    (other / "run.json").write_text(json.dumps({"limit_train": 10, "limit_test": 0}), encoding="utf-8")
    assert harness.main(["--merge", str(harness_run.output), str(other), "--output", str(output)]) == 2
    (other / "run.json").unlink()  # a run without run.json (an older version's): its image counts tell
    shifted.assign(train_images=shifted.train_images - 6).to_csv(other / "results.csv", index=False)
    assert harness.main(["--merge", str(harness_run.output), str(other), "--output", str(output)]) == 2


def test_harness_rescores_a_trained_model_without_training_it_again(
    harness: ModuleType, tiny_root: Path, tmp_path: Path
) -> None:
    """``--rescore``: the trained TDAD tested again with another image score, PatchCore with another neighbour count.
    Their maps are the trained models' (pixel metrics equal: the weights, map statistics and memory bank carried
    over, PatchCore not fitted again); a key a model does not take adds no row; a value it refuses is a failed row
    of its own, with no metrics, beside the trained model's results."""
    patchcore = {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "coreset_sampling_ratio": 0.1}
    models = [{"class_path": "Tdad"}, {"class_path": "Patchcore", "init_args": patchcore}]
    config = tiny_config(tiny_root, models, tmp_path / "tiny.yaml")
    output = tmp_path / "out"
    with torch_threads(int(os.environ.get("OMP_NUM_THREADS", "2"))):
        args = ["--config", str(config), "--image-size", "64", "--heatmaps", "0", "--output", str(output)]
        code = harness.main(
            [*args, "--rescore", "score_topk=[0.5,1.5]", "--rescore", "num_neighbors=1", "--save-models"]
        )
    assert code == 1  # the refused value
    results = pd.read_csv(output / "results.csv").set_index("model")
    tdad = ["TDAD", "TDAD · score_topk=0.5", "TDAD · score_topk=1.5"]
    assert results.index.tolist() == [*tdad, "PatchCore", "PatchCore · num_neighbors=1"]
    assert results.status.tolist() == ["ok", "ok", "failed", "ok", "ok"]
    refused = results.loc["TDAD · score_topk=1.5"]
    assert "score_topk must lie in [0, 1)" in refused["error"] and pd.isna(refused["pixel AUROC"])
    for model, rescore in (("TDAD", "score_topk=0.5"), ("PatchCore", "num_neighbors=1")):
        base, rescored = results.loc[model], results.loc[f"{model} · {rescore}"]
        for metric in ("pixel AUROC", "PRO"):
            assert rescored[metric] == pytest.approx(base[metric], abs=1e-6), (model, metric)
        assert 0.0 <= rescored["image AUROC"] <= 1.0
        assert rescored["fit_s"] == base["fit_s"]  # the same fit, not a new one
    summary = pd.read_csv(output / "summary.csv")
    assert "TDAD · score_topk=0.5" in set(summary.model)

    # --from-models: the saved models tested and rescored again, with the scores of the run that trained them.
    saved = ["--config", str(config), "--image-size", "64", "--heatmaps", "0", "--from-models", str(output / "models")]
    with torch_threads(int(os.environ.get("OMP_NUM_THREADS", "2"))):
        assert harness.main([*saved, "--output", str(tmp_path / "again"), "--rescore", "score_topk=[0.5]"]) == 0
    loaded = pd.read_csv(tmp_path / "again" / "results.csv").set_index("model")
    assert loaded.index.tolist() == ["TDAD", "TDAD · score_topk=0.5", "PatchCore"]
    assert loaded.fit_s.isna().all() and loaded.loaded_from.str.endswith(".pt").all()
    for model in loaded.index:
        for metric in ("image AUROC", "pixel AUROC", "PRO"):
            assert loaded.loc[model, metric] == pytest.approx(results.loc[model, metric], abs=1e-6), (model, metric)
    for path in (output / "models").glob("PatchCore*.pt"):
        path.unlink()
    with torch_threads(int(os.environ.get("OMP_NUM_THREADS", "2"))):
        assert harness.main([*saved, "--output", str(tmp_path / "third")]) == 1
    missing = pd.read_csv(tmp_path / "third" / "results.csv").set_index("model").loc["PatchCore"]
    assert missing.status == "failed" and "no saved model" in missing.error and "--save-models" in missing.error
    assert harness.main([*saved[:-1], str(tmp_path / "nowhere"), "--output", str(tmp_path / "fourth")]) == 2
    with pytest.raises(harness.ConfigError, match="expected KEY=VALUES"):
        harness.rescorings(["score_topk"])
    assert harness.rescorings(["sigma=[2, 8]", "score_topk=0.01"]) == (("sigma", [2, 8]), ("score_topk", 0.01))
    from anomalib_tdad import Tdad

    trained = Tdad(pre_trained=False)  # a list holds values, unless the argument takes a list and its items are none
    assert harness.rescore_values(trained, "sigma", [2, 8]) == [2, 8]
    assert harness.rescore_values(trained, "level_weights", [0.5, 1.0]) == [[0.5, 1.0]]
    assert harness.rescore_values(trained, "level_weights", [[1, 0.5], [0.5, 1]]) == [[1, 0.5], [0.5, 1]]


def test_saved_models_load_whatever_metrics_the_harness_had(harness: ModuleType, common: ModuleType) -> None:
    """Saved models hold the trained state only: a model saved with other metrics (e.g. before per-type PRO) loads;
    one of another network is refused."""
    from anomalib_tdad import Tdad

    model = Tdad(pre_trained=False, evaluator=common.make_evaluator(["crack"]))
    state = harness.trained_state(model)
    assert state and not any(key.startswith("evaluator.") for key in state)
    older = {**state, "evaluator.test_metrics.9.fpr_limit": torch.tensor(0.3)}  # an earlier harness's metric
    fresh = Tdad(pre_trained=False, evaluator=common.make_evaluator(["crack", "hole"]))
    harness.load_trained_state(fresh, older)
    for key, value in harness.trained_state(fresh).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, equal_nan=True, msg=key)
    with pytest.raises(RuntimeError, match="does not fit Tdad: missing"):
        harness.load_trained_state(fresh, {key: value for key, value in state.items() if ".student." not in key})


def test_harness_tracks_validation_metrics_by_epoch(harness: ModuleType, tiny_root: Path, tmp_path: Path) -> None:
    """``--track-every 1``: the metrics after each epoch, the last equal to the test's (anomalib's MVTecAD validates
    on its test set); a cadence must divide a model's epochs."""
    models = [{"class_path": "Tdad"}]
    config = tiny_config(tiny_root, models, tmp_path / "tiny.yaml")
    output = tmp_path / "out"
    with torch_threads(int(os.environ.get("OMP_NUM_THREADS", "2"))):
        args = ["--config", str(config), "--image-size", "64", "--max-epochs", "2", "--heatmaps", "0"]
        code = harness.main([*args, "--track-every", "1", "--output", str(output)])
    assert code == 0
    curve = pd.read_csv(output / "curve.csv")
    results = pd.read_csv(output / "results.csv").set_index("model")
    assert curve.epoch.tolist() == [1, 2] and curve.model.tolist() == ["TDAD", "TDAD"]
    for metric in METRICS:
        assert curve[metric].iloc[-1] == pytest.approx(results.loc["TDAD", metric], abs=1e-6), metric
    assert_png(output / "curve.png")
    assert "## Validation metrics by epoch" in (output / "report.md").read_text(encoding="utf-8")
    job = harness.Job("cpu", {"seed": 0, "model": models[0], "data": {}}, harness.Options(track_every=2))
    with pytest.raises(ValueError, match="--track-every 2 does not divide its 3 epochs"):
        job.cadence(3)
    assert job.cadence(1) == 1 and job.cadence(4) == 2
    assert harness.Job("cpu", job.container, harness.Options()).cadence(40) == 40  # untracked: once, at the end


def test_harness_reports_plots_and_draws_heatmaps(harness_run: HarnessRun) -> None:
    needles = ["TDAD", "PatchCore", *METRICS, "by defect type", "heatmaps.png", "metrics.png", "Versions:", "64 × 64"]
    assert_report(harness_run.output / "report.md", needles)
    assert_png(harness_run.output / "metrics.png")
    assert_png(harness_run.output / "heatmaps.png")


def test_harness_fails_the_run_when_a_job_fails(harness_run: HarnessRun) -> None:
    assert harness_run.code == 1
    results = pd.read_csv(harness_run.output / "results.csv")
    assert "no_such_argument" in results.error.iloc[2]
    report = (harness_run.output / "report.md").read_text(encoding="utf-8")
    assert "Failed jobs" in report and "no_such_argument" in report


def test_harness_leaves_anomalib_untouched(harness_run: HarnessRun) -> None:
    """No anomalib class gains, loses or rebinds an attribute (``PostProcessor._normalize`` among them)."""
    assert harness_run.before.keys() == harness_run.after.keys()
    for cls, before in harness_run.before.items():
        after = harness_run.after[cls]
        assert after.keys() == before.keys(), cls
        changed = [name for name in before if after[name] is not before[name]]
        assert not changed, (cls, changed)
    assert "_normalize" in harness_run.before[PostProcessor]  # the method run_benchmark.py used to rebind


def test_harness_command_exits_non_zero_when_a_job_fails(tmp_path: Path) -> None:
    """The script as run from a shell (anomalib's own benchmark command exits 0 then)."""
    (tmp_path / "data" / "brick").mkdir(parents=True)
    config = tiny_config(tmp_path / "data", [BROKEN], tmp_path / "broken.yaml")
    args = ["--config", str(config), "--output", str(tmp_path / "out")]
    failed = run_script("benchmark.py", *args, cwd=tmp_path, check=False)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "1 of 1 job(s) FAILED" in failed.stdout
    assert pd.read_csv(tmp_path / "out" / "results.csv").status.tolist() == ["failed"]


def test_harness_refuses_missing_data_and_bad_configs_before_running(
    harness: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path / "nowhere", [{"class_path": "Tdad"}], tmp_path / "missing.yaml")
    assert harness.main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran
    config = tiny_config(tmp_path, [{"class_path": "Tdad", "lable": "typo"}], tmp_path / "typo.yaml")
    assert harness.main(["--config", str(config)]) == 2
    assert "lable" in capsys.readouterr().err
    twice = [{"class_path": "Tdad"}, {"class_path": "Tdad", "init_args": {"margin": 0.3}}]
    assert harness.main(["--config", str(tiny_config(tmp_path, twice, tmp_path / "twice.yaml"))]) == 2
    assert "distinct 'label:'" in capsys.readouterr().err


def test_defect_type_metrics_score_each_type_with_the_good_images(common: ModuleType) -> None:
    def batch(kind: str, inside: float) -> SimpleNamespace:
        masks = torch.zeros(2, 16, 16, dtype=torch.bool)
        maps = torch.linspace(0.1, 0.3, 2 * 16 * 16).reshape(2, 16, 16)  # post-processed maps lie in [0, 1]
        if kind != "good":
            masks[:, 4:8, 4:8] = True
            maps[:, 4:8, 4:8] = inside
        paths = [f"root/test/{kind}/{index}.png" for index in range(2)]
        return SimpleNamespace(anomaly_map=maps, gt_mask=masks, image_path=paths)

    evaluator = common.make_evaluator(["found", "faint"])
    by_name = {metric.name: metric for metric in evaluator.test_metrics}
    per_type = {f"pixel_{metric}[{kind}]" for metric in ("AUROC", "AUPRO") for kind in ("found", "faint")}
    assert {"image_AUROC", "pixel_AUROC", "pixel_AUPRO", *per_type} == set(by_name)
    assert by_name["pixel_AUPRO"].fpr_limit == pytest.approx(0.3)
    assert by_name["pixel_AUPRO[found]"].fpr_limit == pytest.approx(0.3)
    batches = [batch("good", 0.0), batch("found", 1.0), batch("faint", 0.25), batch("good", 0.0)]
    for item in batches:
        for name in per_type:
            by_name[name].update(item)
    for metric in ("AUROC", "AUPRO"):
        assert by_name[f"pixel_{metric}[found]"].compute().item() == pytest.approx(1.0), metric
        assert 0.05 < by_name[f"pixel_{metric}[faint]"].compute().item() < 0.95, metric
    # the same as scikit-learn's AUROC and anomalib's AUPRO over that type's images and the good ones
    chosen = [item for item in batches if item.image_path[0].split("/")[2] in {"good", "faint"}]
    maps, masks = torch.cat([item.anomaly_map for item in chosen]), torch.cat([item.gt_mask for item in chosen])
    auroc = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert by_name["pixel_AUROC[faint]"].compute().item() == pytest.approx(auroc)
    pro = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)
    pro.update(SimpleNamespace(anomaly_map=maps, gt_mask=masks))
    assert by_name["pixel_AUPRO[faint]"].compute().item() == pytest.approx(pro.compute().item())


def test_defect_types_need_a_good_folder(common: ModuleType) -> None:
    mvtec = SimpleNamespace(samples=pd.DataFrame({"image_path": ["r/test/good/0.png", "r/test/crack/1.png"]}))
    kolektor = SimpleNamespace(samples=pd.DataFrame({"image_path": ["r/kos01/Part0.jpg", "r/kos02/Part5.jpg"]}))
    assert common.defect_types(mvtec) == ["crack"]
    assert common.defect_types(kolektor) == []


def test_epochs_come_from_the_model_the_command_line_the_entry_the_trainer_then_default_epochs(
    harness: ModuleType,
) -> None:
    """Memory banks keep their one epoch; TDAD's ``default_epochs`` applies when nothing sets a length."""
    tdad = SimpleNamespace(trainer_arguments={"num_sanity_val_steps": 0}, default_epochs=40)
    stfpm = SimpleNamespace(trainer_arguments={})
    patchcore = SimpleNamespace(trainer_arguments={"max_epochs": 1})

    def epochs(model: SimpleNamespace, cli: int | None = None, entry: int | None = None, trainer: int | None = None):
        container = {"seed": 0, "model": {"class_path": "X", **({"max_epochs": entry} if entry else {})}, "data": {}}
        options = harness.Options(max_epochs=cli, trainer={"max_epochs": trainer} if trainer else {})
        return harness.Job("cpu", container, options).epochs(model)

    assert epochs(tdad) == 40
    assert epochs(tdad, trainer=5) == 5
    assert epochs(tdad, entry=7, trainer=5) == 7
    assert epochs(tdad, cli=3, entry=7, trainer=5) == 3
    assert epochs(patchcore, cli=3, entry=7, trainer=5) == 1
    assert epochs(stfpm, entry=7) == 7
    with pytest.raises(ValueError, match="no training length"):
        epochs(stfpm)


def test_summary_has_mean_and_sample_std_per_dataset_and_the_mean_over_datasets(harness: ModuleType) -> None:
    rows = [
        {"model": model, "dataset": dataset, "seed": seed, "status": "ok", "image AUROC": value}
        for model, offset in [("A", 0.0), ("B", 0.1)]
        for dataset, base in [("one", 0.5), ("two", 0.7)]
        for seed, value in enumerate([base + offset, base + offset + 0.1])
    ]
    rows.append({"model": "C", "dataset": "one", "seed": 0, "status": "ok", "image AUROC": 0.9})  # not on "two"
    rows.append({"model": "A", "dataset": "one", "seed": 2, "status": "failed", "image AUROC": float("nan")})
    summary = harness.summarize(pd.DataFrame(rows), ["image AUROC"]).set_index(["dataset", "model"])
    assert summary.loc[("one", "A"), "image AUROC_mean"] == pytest.approx(0.55)
    assert summary.loc[("one", "A"), "image AUROC_std"] == pytest.approx(0.1 / 2**0.5)
    assert summary.loc[("one", "A"), "runs"] == 2
    assert summary.loc[(harness.MEAN_LABEL, "B"), "image AUROC_mean"] == pytest.approx(0.75)
    assert (harness.MEAN_LABEL, "C") not in summary.index


def raw_outputs() -> ImageBatch:
    """12 images' raw scores and 4x4 maps far outside [0, 1] (as PaDiM's are), with ties across the labels.

    Image scores tie at the value F1 picks as threshold (130); the highest and lowest lie more than half the
    range from it, where anomalib's default post-processor clamps them to 1 or 0, tying both labels. Likewise,
    the pixel threshold is a defect's 4200; a normal pixel ties with it and the rest of the map lies far below.
    """
    scores = torch.tensor([-2000.0, -1900, -1800, 120, 130, 130, 130, 135, 2900, 2990, 3000, 140])
    labels = torch.tensor([0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0])
    count = len(scores)
    maps = ((torch.arange(count * 16) % 7) * 50.0 - 100).view(count, 1, 4, 4)  # -100 ... 200, in both labels
    masks = torch.zeros(count, 4, 4, dtype=torch.bool)
    masks[labels.bool(), 1:3, 1:3] = True
    maps[:, 0][masks] = torch.tensor([150.0, 200, 4200, 4300]).repeat(int(labels.sum()))
    maps[0, 0, 0, :3] = torch.tensor([4000.0, 4100, 4200])  # normal pixels in the far tail, one at the threshold
    maps[0, 0, 3, 3] = -3000.0
    return ImageBatch(
        image=torch.zeros(count, 3, 4, 4), pred_score=scores, gt_label=labels, anomaly_map=maps, gt_mask=masks
    )


def post_processed(post_processor: PostProcessor) -> tuple[ImageBatch, float, float]:
    """Fit ``post_processor`` on the raw outputs as validation set and post-process them as test set, as the
    benchmarks do; return the batch and anomalib's image and pixel AUROC of it (the benchmarks' metrics)."""
    post_processor.on_validation_batch_end(None, None, raw_outputs())
    post_processor.on_validation_epoch_end(None, None)
    batch = raw_outputs()
    post_processor.post_process_batch(batch)
    image, pixel = AUROC(fields=["pred_score", "gt_label"]), AUROC(fields=["anomaly_map", "gt_mask"])
    image.update(batch)
    pixel.update(batch)
    return batch, image.compute().item(), pixel.compute().item()


def test_validation_auroc_is_that_of_the_raw_scores_also_above_sigmoid_saturation(common: ModuleType) -> None:
    """Unscaled scores above about 16.6 all read 1 through torchmetrics' sigmoid (ties); the validation metric keeps
    their order."""
    scores = torch.tensor([17.0, 18.0, 19.0, 20.0, -3.0, 1e4])
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    batch = SimpleNamespace(pred_score=scores, gt_label=labels)
    evaluator = common.make_evaluator(validation=True)
    by_name = {metric.name: metric for metric in evaluator.val_metrics}
    assert {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"} == set(by_name)
    by_name["image_AUROC"].update(batch)
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert by_name["image_AUROC"].compute().item() == pytest.approx(expected)
    plain = AUROC(fields=["pred_score", "gt_label"], prefix="image_")
    plain.update(batch)
    assert plain.compute().item() != pytest.approx(expected)  # the tie this metric avoids


def test_min_max_post_processor_keeps_the_auroc_of_the_raw_scores(common: ModuleType) -> None:
    """The benchmarks' AUROC (anomalib's, on post-processed outputs) is the raw scores' (scikit-learn's).

    anomalib's default post-processor, which clamps around the threshold, changes it on these outputs: that is
    why every benchmark model gets ``MinMaxPostProcessor``.
    """
    raw = raw_outputs()
    raw_image = roc_auc_score(raw.gt_label.numpy(), raw.pred_score.numpy())
    raw_pixel = roc_auc_score(raw.gt_mask.flatten().numpy(), raw.anomaly_map.flatten().numpy())
    post_processor = common.MinMaxPostProcessor()
    batch, image, pixel = post_processed(post_processor)
    assert (image, pixel) == (pytest.approx(raw_image, abs=1e-6), pytest.approx(raw_pixel, abs=1e-6))
    for values in (batch.pred_score, batch.anomaly_map):  # in [0, 1], so torchmetrics applies no sigmoid
        assert values.min() == 0 and values.max() == 1
    # the threshold moves with the scores: the same labels as the raw scores against the raw thresholds
    assert torch.equal(batch.pred_label, raw.pred_score > post_processor.image_threshold)
    assert torch.equal(batch.pred_mask, raw.anomaly_map > post_processor.pixel_threshold)
    _, default_image, default_pixel = post_processed(PostProcessor())
    assert default_image != pytest.approx(raw_image, abs=1e-3) and default_pixel != pytest.approx(raw_pixel, abs=1e-3)


def test_dev_and_ablation_configs_expand_to_their_grids(harness: ModuleType) -> None:
    expected = {
        "dev.yaml": ["TDAD", "RD (TDAD λs=λd=0, same teacher)", "PatchCore", "PaDiM", "STFPM"],
        "ablation.yaml": ["GKD", "GKD+SCD", "GKD+DMD", "GKD+SCD+DMD"],
    }
    args = harness.parse_args(["--config", "unused"])
    for name, labels in expected.items():
        config = harness.load_config(BENCHMARKS / name, args)
        jobs = harness.expand_jobs(config, harness.Options())
        assert len(jobs) == len(labels) * 3 * 2, name
        assert list(dict.fromkeys(job.label for job in jobs)) == labels
        assert [job.seed for job in jobs[:: len(labels) * 2]] == [0, 1, 2]  # seed-major, as anomalib expands
        assert list(dict.fromkeys(job.dataset for job in jobs)) == ["MVTecAD/magnetic_tile", "Kolektor"]
        roots = {job.container["data"]["init_args"]["root"] for job in jobs}
        assert all(Path(root).is_absolute() for root in roots)
        assert roots == {
            str((Path.cwd() / "../shared/data").resolve()),
            str((Path.cwd() / "../shared/data/kolektor").resolve()),
        }


def test_command_line_picks_models_and_sets_their_arguments(harness: ModuleType) -> None:
    """``--models``, ``--datasets`` and ``--init-arg`` match an exact label, else class names or labels ignoring
    case; ``--seeds`` replaces the seeds."""
    args = ["--config", "unused", "--models", "Tdad", "padim", "--init-arg", "Tdad.margin=0.3", "--seeds", "5"]
    args += ["--datasets", "mvtecad/magnetic_tile"]
    config = harness.load_config(BENCHMARKS / "dev.yaml", harness.parse_args(args))
    jobs = harness.expand_jobs(config, harness.Options())
    assert {job.dataset for job in jobs} == {"MVTecAD/magnetic_tile"}
    assert list(dict.fromkeys(job.label for job in jobs)) == ["TDAD", RD_LABEL, "PaDiM"]
    assert {job.seed for job in jobs} == {5}
    margins = {job.label: job.container["model"].get("init_args", {}).get("margin") for job in jobs}
    assert margins == {"TDAD": 0.3, RD_LABEL: 0.3, "PaDiM": None}
    exact = ["--config", "unused", "--models", "TDAD", "--init-arg", "TDAD.margin=0.2"]  # a label: that entry only
    config = harness.load_config(BENCHMARKS / "dev.yaml", harness.parse_args(exact))
    assert config["benchmark"]["model"] == {"class_path": "Tdad", "init_args": {"margin": 0.2}}
    labelled = ["--config", "unused", "--models", RD_LABEL, "--init-arg", f"{RD_LABEL}.sigma=2"]  # "=" in the label
    config = harness.load_config(BENCHMARKS / "dev.yaml", harness.parse_args(labelled))
    assert config["benchmark"]["model"]["init_args"] == {"lambda_scd": 0.0, "lambda_dmd": 0.0, "sigma": 2}
    with pytest.raises(harness.ConfigError, match=r"expects CLASS_OR_LABEL\.KEY=VALUE"):
        harness.load_config(BENCHMARKS / "dev.yaml", harness.parse_args([*labelled[:4], "--init-arg", "Tdad.sigma"]))


@pytest.mark.parametrize(
    ("config_name", "labels"),
    [
        ("dev.yaml", ["TDAD", RD_LABEL, "PatchCore", "PaDiM", "STFPM"]),
        ("ablation.yaml", ["GKD", "GKD+SCD", "GKD+DMD", "GKD+SCD+DMD"]),
        ("mvtec_lite0_offline.yaml", ["TDAD", RD_LABEL, "PatchCore", "STFPM", "PaDiM"]),
    ],
)
def test_offline_config_models_build_with_the_benchmark_components(
    harness: ModuleType, common: ModuleType, config_name: str, labels: list[str]
) -> None:
    """Every model of the Lite0 configs builds with no network, the evaluator and post-processor passed in."""
    config = harness.load_config(BENCHMARKS / config_name, harness.parse_args(["--config", "unused"]))
    models = {}
    for job in harness.expand_jobs(config, harness.Options(image_size=64)):
        if job.label not in models:
            models[job.label] = job.model(["crack"])
    assert list(models) == labels
    for label, model in models.items():
        assert isinstance(model.post_processor, common.MinMaxPostProcessor), label
        assert {"pixel_AUPRO", "pixel_AUROC[crack]"} <= {metric.name for metric in model.evaluator.test_metrics}
    weights = {
        label: (m.hparams.lambda_gkd, m.hparams.lambda_scd, m.hparams.lambda_dmd)
        for label, m in models.items()
        if "lambda_gkd" in m.hparams
    }
    if RD_LABEL in weights:  # the RD stand-in: plain reverse distillation
        assert weights[RD_LABEL] == (1.0, 0.0, 0.0)
    for label in {"TDAD", RD_LABEL} & set(models):  # at the package's default levels, not an older version's
        assert models[label].model.layers == common.TDAD_LAYERS, label
    if config_name == "dev.yaml":
        assert models["PatchCore"].coreset_sampling_ratio == 0.1  # anomalib's default
        assert models["PaDiM"].model.n_features == 100
    if config_name == "ablation.yaml":
        assert list(weights.values()) == [(1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (1.0, 0.0, 1.0), (1.0, 1.0, 1.0)]


def model_entries(config_name: str) -> list[dict]:
    """The model grid of a benchmark config, after checking the parts every config shares."""
    config = yaml.safe_load((BENCHMARKS / config_name).read_text(encoding="utf-8"))
    data = config["benchmark"]["data"]
    assert data["class_path"] == "MVTecAD"
    assert set(data["init_args"]["category"]["grid"]) == MVTEC_CATEGORIES
    return config["benchmark"]["model"]["grid"]


@pytest.mark.parametrize("config_name", ["mvtec_wide_resnet50.yaml", "mvtec_lite0_offline.yaml"])
def test_benchmark_config_models_exist_and_take_their_arguments(config_name: str) -> None:
    import anomalib.models

    for entry in model_entries(config_name):
        model_class = getattr(anomalib.models, entry["class_path"])  # a bare name, as `anomalib benchmark` needs
        accepted = inspect.signature(model_class).parameters
        assert set(entry.get("init_args", {})) <= set(accepted), entry


def test_wide_resnet_config_runs_with_bare_anomalib_benchmark() -> None:
    """anomalib 2.7 collects results with the first job's keys only: every entry must have the same ones.

    Guards benchmarks/README's promise that this config also runs under bare ``anomalib benchmark``.
    """
    entries = model_entries("mvtec_wide_resnet50.yaml")
    assert {entry["class_path"] for entry in entries} == {"Tdad", "Patchcore", "ReverseDistillation", "Stfpm", "Padim"}
    assert len({tuple(sorted(entry["init_args"])) for entry in entries}) == 1
    assert all(set(entry) == {"class_path", "init_args"} for entry in entries)  # no harness-only keys
    assert {entry["init_args"]["backbone"] for entry in entries} == {"wide_resnet50_2"}


@pytest.mark.slow
def test_offline_mvtec_config_runs_on_tiny_data(harness: ModuleType, tiny_root: Path, tmp_path: Path) -> None:
    """The MVTec AD config through the harness, its categories replaced by the tiny ``brick``."""
    output = tmp_path / "benchmark"
    args = ["--config", str(BENCHMARKS / "mvtec_lite0_offline.yaml"), "--root", str(tiny_root), "--categories", "brick"]
    args += ["--max-epochs", "1", "--image-size", "64", "--accelerator", "cpu", "--num-workers", "0"]
    args += ["--init-arg", "Patchcore.coreset_sampling_ratio=0.05", "--heatmaps", "1", "--output", str(output)]
    assert harness.main(args) == 0
    results = pd.read_csv(output / "results.csv")
    assert results.model.tolist() == MODEL_LABELS
    assert (results.status == "ok").all()
    assert_scores(results, METRICS)
    assert_report(output / "report.md", MODEL_LABELS)
    assert_png(output / "metrics.png")
    assert_png(output / "heatmaps.png")


def run_speed(tiny_root: Path, output: Path, *extra: str) -> pd.DataFrame:
    """``speed.py`` on TDAD at 64 px, one thread, 8 training and 8 timed images, 24 streamed; its ``speed.csv``."""
    args = ["--root", str(tiny_root), "--category", "brick", "--image-size", "64", "--models", "tdad", "--threads", "1"]
    args += ["--train-images", "8", "--infer-images", "8", "--stream-images", "24", "--output", str(output), *extra]
    run_script("speed.py", *args, cwd=output.parent)
    speed = pd.read_csv(output / "speed.csv").set_index("model")
    assert speed.index.tolist() == ["TDAD", "teacher only"]
    assert speed.error.isna().all()
    assert speed.loc["TDAD", "train_s_per_epoch"] > 0
    for column in ["eager_images_per_s", "eager_mem_mb"]:
        assert (speed[column] > 0).all(), column
    return speed


def test_speed_measures_tdad_and_the_teacher_with_streaming(tiny_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "speed"
    speed = run_speed(tiny_root, output, "--no-openvino")
    assert speed.openvino_images_per_s.isna().all()
    stream = pd.read_csv(output / "stream.csv")
    assert stream.images.tolist() == [0, 8, 16, 24]
    assert (stream.rss_mb > 0).all()
    assert_report(output / "report.md", ["TDAD / teacher only", "Streaming", "TDAD's eager inference by part"])
    assert_png(output / "stream.png")


def test_speed_times_anomalibs_default_fit_of_a_source_checkout(tiny_root: Path, tmp_path: Path) -> None:
    """``--fit-data``: the default Engine's fit in a fresh process, validating at the model's cadence."""
    data = {"class_path": "MVTecAD", "init_args": {"root": str(tiny_root), "category": "brick", "num_workers": 0}}
    output = tmp_path / "fit"
    args = ["--fit-data", json.dumps(data), "--fit-epochs", "2", "--fit-versions", str(BENCHMARKS.parent)]
    run_script("speed.py", *args, "--threads", "1", "--output", str(output), cwd=tmp_path)
    fit = pd.read_csv(output / "fit.csv")
    assert fit.source.tolist() == [str(BENCHMARKS.parent)]
    assert fit.epochs.tolist() == [2]
    assert fit.validations.tolist() == [1]  # the default cadence (5 epochs): only after the last one
    assert (fit.s_per_epoch > 0).all()
    assert_report(output / "report.md", ["default Engine, 2 epochs", "speed-up"])


def test_speed_times_the_teacher_by_images_per_call(tmp_path: Path) -> None:
    """``--teacher-calls``: the teacher alone per call size and the package's chunked teacher, at each size."""
    output = tmp_path / "calls"
    args = ["--teacher-calls", "1", "3", "--image-size", "32", "64", "--threads", "1", "--output", str(output)]
    run_script("speed.py", *args, cwd=tmp_path)
    calls = pd.read_csv(output / "teacher_calls.csv")
    assert calls.image_size.tolist() == [32] * 3 + [64] * 3
    assert calls.images_per_call.tolist() == ["1", "3", "package Teacher"] * 2
    assert (calls.ms_per_image > 0).all()
    assert_report(output / "report.md", ["Milliseconds per image, by images per call", "package Teacher"])
    refused = run_script("speed.py", "--teacher-calls", "0", "--output", str(output), cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "at least 1" in refused.stderr


@pytest.mark.slow
def test_speed_times_the_openvino_exports(tiny_root: Path, tmp_path: Path) -> None:
    """The OpenVINO exports (f32 and INT8) alone take about a minute on 2 cores."""
    speed = run_speed(tiny_root, tmp_path / "speed")
    for column in ["openvino_images_per_s", "openvino_mem_mb", "openvino_int8_images_per_s", "openvino_int8_mem_mb"]:
        assert (speed[column] > 0).all(), column
    assert_report(tmp_path / "speed" / "report.md", ["OpenVINO INT8 against f32", "INT8 speed-up"])


def test_speed_random_bank_patchcore_overrides_fit_in_a_subclass(common: ModuleType) -> None:
    """speed.py's PatchCore with a random bank of anomalib's default ratio changes no anomalib class."""
    from anomalib.models import Patchcore
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    speed = importlib.import_module("speed")
    before = dict(vars(Patchcore)), dict(vars(PatchcoreModel))
    model = speed.patchcore_default_bank(64)
    assert type(model) is speed.RandomBankPatchcore and isinstance(model, Patchcore)
    patches = torch.arange(200.0).repeat(3, 1).T  # 200 distinct embeddings
    model.model.embedding_store.extend(patches.split(50))
    model.fit()
    assert model.model.memory_bank.shape == (int(200 * speed.ANOMALIB_CORESET_RATIO), 3)
    assert set(model.model.memory_bank[:, 0].tolist()) <= set(range(200)) and not model.model.embedding_store
    assert (dict(vars(Patchcore)), dict(vars(PatchcoreModel))) == before
    assert "subsample_embedding" not in vars(model.model)
