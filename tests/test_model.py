"""The torch model: any timm CNN teacher gets a student; maps have the input size; training learns."""

import copy
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib.data import InferenceBatch
from conftest import quiet_engine, tiny_datamodule
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from anomalib_tdad import Tdad
from anomalib_tdad.models.tdad import teacher as teacher_module
from anomalib_tdad.models.tdad import torch_model as torch_model_module
from anomalib_tdad.models.tdad.corruption import Corruption
from anomalib_tdad.models.tdad.torch_model import TdadModel

BACKBONES = {
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "tf_efficientnet_lite0": ("blocks.1", "blocks.2", "blocks.4"),
    "mobilenetv2_100": ("blocks.1", "blocks.2", "blocks.4"),
    "convnext_atto": ("stages.0", "stages.1", "stages.2"),
}


def untrained_tdad(**kwargs: Any) -> Tdad:
    """A Tdad on a randomly initialised ResNet-18 teacher (no weights needed), with ``kwargs`` on top."""
    return Tdad(backbone="resnet18", layers=BACKBONES["resnet18"], pre_trained=False, **kwargs)


def quiet_trainer(model: Tdad, *callbacks: Callback, **kwargs: Any) -> Trainer:
    """A Lightning trainer with ``model``'s own callbacks and ``callbacks``: no logger, progress bar or summary, and
    no checkpoints unless one of ``callbacks`` writes them."""
    return Trainer(
        logger=False,
        enable_checkpointing=any(isinstance(callback, ModelCheckpoint) for callback in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*model.configure_callbacks(), *callbacks],
        **kwargs,
    )


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_builds_and_maps_have_the_input_size(backbone: str) -> None:
    model = TdadModel(backbone, BACKBONES[backbone], pre_trained=False)
    images = torch.randn(2, 3, 96, 128)  # non-square, not a multiple of 32 in one side
    model.train()
    teacher, student = model(images)
    assert [s.shape for s in student] == [t.shape for t in teacher]
    model.eval()
    with torch.no_grad():
        output = model(images)
    assert isinstance(output, InferenceBatch)
    assert output.anomaly_map.shape == (2, 1, 96, 128)
    assert output.pred_score.shape == (2,)
    assert torch.allclose(output.pred_score, output.anomaly_map.flatten(1).amax(1))


@pytest.mark.parametrize(
    ("backbone", "levels", "embedding_dim"),
    [
        ("tf_efficientnet_lite0", ["blocks.2", "blocks.4", "blocks.6"], 256),
        ("resnet18", ["layer2", "layer3", "layer4"], 512),
        ("wide_resnet50_2", ["layer2", "layer3", "layer4"], 2048),
        ("mobilenetv2_100", ["blocks.2", "blocks.4", "blocks.6"], 256),
        ("convnext_atto", ["stages.1", "stages.2", "stages.3"], 320),
    ],
)
def test_default_layers_follow_the_backbone(backbone: str, levels: list[str], embedding_dim: int) -> None:
    """Without ``layers`` every backbone gets its stride-8, 16 and 32 levels, and an embedding twice as wide as the
    stride-16 level (at least 256); the hyper-parameters record both as built."""
    model = Tdad(backbone=backbone, pre_trained=False)
    assert model.model.layers == levels
    assert model.model.teacher.reductions == [8, 16, 32]
    assert model.model.student.embedding_dim == embedding_dim
    assert (model.hparams["layers"], model.hparams["embedding_dim"]) == (levels, embedding_dim)


def test_the_teacher_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only one timm model gets real weights allocated; the level listing is built on the meta device."""
    import timm

    built: list[str] = []
    create = timm.create_model

    def counting(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = create(*args, **kwargs)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(timm, "create_model", counting)
    untrained_tdad()
    assert built.count("cpu") == 1


def test_a_large_cpu_batch_runs_through_the_teacher_in_chunks_with_the_same_features(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls of at most ``CPU_CHUNK_PIXELS`` input pixels; the features equal one pass; exports see one call."""
    model = TdadModel("resnet18", BACKBONES["resnet18"], pre_trained=False).eval()
    calls: list[int] = []
    hook = model.teacher.feature_extractor.register_forward_hook(lambda _, inputs, __: calls.append(len(inputs[0])))
    images = torch.randn(5, 3, 64, 64)
    whole = model.teacher(images)
    monkeypatch.setattr(teacher_module, "CPU_CHUNK_PIXELS", 2 * 64 * 64 + 1)  # two 64-px images per call
    chunked = model.teacher(images)
    assert calls == [5, 2, 2, 1]
    for one_pass, in_chunks in zip(whole, chunked, strict=True):
        assert torch.equal(in_chunks, one_pass)  # the teacher is frozen and has no batch statistics
        assert in_chunks.is_contiguous(memory_format=torch.channels_last)

    hook.remove()  # it reads the batch size, which would fix it in the exported graph
    batch = torch.export.Dim("batch", min=1, max=16)
    exported = torch.export.export(model.teacher, (images,), dynamic_shapes=({0: batch},))
    for size in (3, 7):  # a graph traced with chunks would have fixed the batch of 5
        more = torch.randn(size, 3, 64, 64)
        for graph, eager in zip(exported.module()(more), model.teacher(more), strict=True):
            torch.testing.assert_close(graph, eager)


def test_teacher_is_frozen_in_any_mode() -> None:
    """The teacher's BatchNorm keeps its statistics in train mode: same features, no buffer moves, no gradients."""
    model = TdadModel("resnet18", BACKBONES["resnet18"], pre_trained=False)
    images = torch.randn(2, 3, 64, 64)
    before = {name: value.clone() for name, value in model.teacher.state_dict().items()}
    expected = model.eval().teacher(images)
    model.train()
    teacher, student = model(images)
    for name, value in model.teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    for train_mode, eval_mode in zip(teacher, expected, strict=True):
        torch.testing.assert_close(train_mode, eval_mode)
    sum(s.mean() for s in student).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())
    assert not any(t.requires_grad for t in teacher)


def test_level_weights_weight_each_levels_map() -> None:
    """The map is linear in the level weights: weights (a, b, c) give a*map(1,0,0) + b*map(0,1,0) + c*map(0,0,1)."""
    torch.manual_seed(0)
    model = TdadModel("resnet18", BACKBONES["resnet18"], pre_trained=False, sigma=1.0, standardize=False).eval()
    images = torch.randn(2, 3, 64, 64)

    def anomaly_map(weights: tuple[float, ...]) -> torch.Tensor:
        model.anomaly_map_generator.level_weights = list(weights)
        with torch.no_grad():
            return model(images).anomaly_map

    levels = [anomaly_map(tuple(float(i == level) for i in range(3))) for level in range(3)]
    assert torch.allclose(anomaly_map((1.0, 1.0, 1.0)), sum(levels), atol=1e-5)
    assert torch.allclose(anomaly_map((0.25, 0.0, 2.0)), 0.25 * levels[0] + 2.0 * levels[2], atol=1e-5)
    assert not torch.allclose(levels[0], levels[2])


def test_topk_score_is_between_mean_and_max() -> None:
    model = TdadModel("resnet18", BACKBONES["resnet18"], pre_trained=False, score_topk=0.05).eval()
    with torch.no_grad():
        output = model(torch.randn(2, 3, 64, 64))
    flat = output.anomaly_map.flatten(1)
    assert torch.all(output.pred_score <= flat.amax(1)) and torch.all(output.pred_score >= flat.mean(1))
    assert torch.all(output.pred_score < flat.amax(1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "no_such_net"}, "Unknown timm backbone"),
        ({"backbone": "resnet18", "layers": ("layer1", "layer9")}, "choose two or more of"),
        ({"backbone": "resnet18", "layers": ("layer3", "layer1", "layer2")}, "increasing stride"),
        ({"backbone": "resnet18", "score_topk": 1.5}, "score_topk"),
        ({"backbone": "resnet18", "level_weights": (1.0, 1.0)}, "level_weights must be 3"),
        ({"backbone": "resnet18", "level_weights": (1.0, -1.0, 1.0)}, "non-negative"),
    ],
)
def test_bad_model_arguments_get_clear_errors(kwargs: dict, message: str) -> None:
    kwargs.setdefault("layers", ("layer1", "layer2", "layer3"))
    with pytest.raises(ValueError, match=message):
        TdadModel(pre_trained=False, **kwargs)


@pytest.mark.parametrize("bf16_student", [False, True])
def test_training_steps_reduce_the_loss(bf16_student: bool) -> None:
    torch.manual_seed(0)
    model = untrained_tdad(bf16_student=bf16_student)
    assert model.model.bf16_student is bf16_student
    model.model.train()
    images = torch.randn(4, 3, 64, 64)
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(15):
        torch.manual_seed(1)  # the same corruption every step: only the student changes
        loss, terms = model.compute_loss(images)
        assert set(terms) == {"gkd", "scd", "dmd"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize(("bf16_student", "native"), [(True, False), (False, True), (None, True), (None, False)])
def test_the_student_trains_in_bf16_where_asked_and_hands_back_float32(
    bf16_student: bool | None, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``None`` follows the CPU's native bf16 support; losses, statistics and inference always see float32."""
    monkeypatch.setattr(torch_model_module, "native_bf16_cpu", lambda: native)
    model = TdadModel("resnet18", BACKBONES["resnet18"], pre_trained=False, bf16_student=bf16_student).train()
    dtypes: list[torch.dtype] = []
    model.student.decoder.heads[0].register_forward_hook(lambda _, __, output: dtypes.append(output.dtype))
    images = torch.randn(2, 3, 64, 64)
    teacher, student = model(images)
    wanted = bf16_student if bf16_student is not None else native
    assert dtypes == [torch.bfloat16 if wanted else torch.float32]
    assert all(level.dtype == torch.float32 for level in [*teacher, *student])
    model.fit_statistics([images])
    with torch.no_grad():
        output = model.eval()(images)
    assert dtypes[1:] == [torch.float32, torch.float32]  # the statistics pass and inference
    assert output.anomaly_map.dtype == torch.float32
    if not wanted:  # an outer autocast (Lightning's precision="bf16-mixed") stays in force
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, student = model.train()(images)
        assert dtypes[-1] == torch.bfloat16
        assert all(level.dtype == torch.bfloat16 for level in student)  # as the outer autocast made them


def test_plain_reverse_distillation_skips_the_corruption(monkeypatch: pytest.MonkeyPatch) -> None:
    model = untrained_tdad(lambda_scd=0, lambda_dmd=0)
    monkeypatch.setattr(model.corruption, "forward", lambda *_: pytest.fail("corruption ran"))
    model.model.train()
    _, terms = model.compute_loss(torch.randn(2, 3, 64, 64))
    assert set(terms) == {"gkd"}


def test_corruption_changes_pixels_only_inside_its_mask() -> None:
    torch.manual_seed(0)
    model = untrained_tdad(perlin_probability=1.0, mask_probability=1.0)
    images = (torch.rand(4, 3, 64, 64) - model.corruption.mean) / model.corruption.std
    corrupted, mask = model.corruption(images)
    assert mask.shape == (4, 1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(mask.flatten(1).sum(1) > 0)
    outside = (mask == 0).expand_as(images)
    assert torch.allclose(corrupted[outside], images[outside], atol=1e-5)
    assert (corrupted - images).abs()[~outside].mean() > 0.05


def test_shading_anomalies_scale_the_images_own_pixels_inside_the_mask() -> None:
    torch.manual_seed(0)
    corruption = Corruption(
        perlin_probability=1.0, mask_probability=0.0, scar_probability=0.0, shade_ratio=1.0, shade_gain=(1.3, 1.5)
    )
    pixels = torch.rand(6, 3, 64, 64) * 0.4 + 0.3  # no clipping at 0 or 1 for gains up to 1.5
    corrupted, mask = corruption(pixels)
    assert torch.all(mask.flatten(1).sum(1) > 0)
    ratio = corrupted / pixels
    outside = (mask == 0).expand_as(pixels)
    assert torch.allclose(ratio[outside], torch.ones(()), atol=1e-5)
    gains = [ratio[i][(mask[i] > 0).expand(3, -1, -1)] for i in range(6)]
    for gain in gains:  # one gain per image, in the range or its inverse
        assert gain.std() < 1e-4
        assert 1.3 - 1e-4 <= max(gain.mean(), 1 / gain.mean()) <= 1.5 + 1e-4
    assert {bool(g.mean() > 1) for g in gains} == {True, False}  # brighter and darker both occur


def coordinate_images(batch: int, height: int, width: int) -> torch.Tensor:
    """Images whose first two channels encode each pixel's row and column, and whose third is a constant 0.4."""
    rows = 0.2 + 0.25 * (torch.arange(height) + 0.5) / height
    columns = 0.2 + 0.25 * (torch.arange(width) + 0.5) / width
    planes = [rows.view(-1, 1).expand(height, width), columns.view(1, -1).expand(height, width)]
    return torch.stack([*planes, torch.full((height, width), 0.4)]).expand(batch, -1, -1, -1).clone()


@pytest.mark.parametrize(("height", "width"), [(256, 256), (96, 200)])
def test_scars_are_thin_strips_of_the_images_own_pixels_from_elsewhere_darkened_or_brightened(
    height: int, width: int
) -> None:
    torch.manual_seed(0)
    corruption = Corruption(perlin_probability=0.0, mask_probability=0.0, scar_probability=1.0)
    pixels = coordinate_images(8, height, width)
    corrupted, mask = corruption(pixels)
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, 1.0}
    outside = (mask == 0).expand_as(pixels)
    assert torch.equal(corrupted[outside], pixels[outside])
    scale, shifts, gains = min(height, width) / 256, set(), []
    for changed, scar in zip(corrupted, mask[:, 0] > 0, strict=True):
        rows, columns = torch.nonzero(scar, as_tuple=True)
        area, extent = len(rows), max(int(rows.max() - rows.min()), int(columns.max() - columns.min())) + 1
        assert 0 < area <= (8 * 64 + 2 * (8 + 64)) * scale**2  # at most 8 by 64 px (plus rasterized edges) at 256 px
        assert extent**2 >= 2 * area  # a strip, not a blob
        gain = changed[2, scar] / 0.4
        assert gain.std() < 1e-5  # one gain per scar
        gains.append(gain.mean())
        source = (changed[:2, scar] / gain - 0.2) / 0.25 * torch.tensor([[height], [width]]) - 0.5
        assert torch.allclose(source, source.round(), atol=1e-2)  # pixels of this image, from the grid
        shift = (rows - source[0].round().long()) % height, (columns - source[1].round().long()) % width
        shifts |= {(int(dy), int(dx)) for dy, dx in zip(*shift, strict=True)}
    assert len(shifts) == 1 and shifts != {(0, 0)}  # moved from elsewhere, by one shift per batch
    assert all(1.2 - 1e-4 <= max(gain, 1 / gain) <= 2 + 1e-4 for gain in gains)  # visible: shade_gain either way
    assert {bool(gain > 1) for gain in gains} == {True, False}


def test_scars_are_at_least_a_pixel_wide_on_small_inputs() -> None:
    torch.manual_seed(0)
    corruption = Corruption(perlin_probability=0.0, mask_probability=0.0, scar_probability=1.0)
    _, mask = corruption(torch.rand(64, 1, 32, 32))
    assert bool((mask.flatten(1).amax(1) > 0).all())  # every drawn scar is drawn


def test_no_scars_draw_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """``scar_probability=0`` never calls the scars: such runs are those of versions before the scars."""
    with monkeypatch.context() as patch:
        patch.setattr(Corruption, "scars", lambda *_: pytest.fail("scars ran"))
        Corruption(perlin_probability=1.0, mask_probability=1.0, scar_probability=0.0)(torch.rand(4, 3, 64, 64))
    torch.manual_seed(0)
    _, mask = Corruption(perlin_probability=0.0, mask_probability=0.0, scar_probability=0.5)(torch.rand(64, 3, 64, 64))
    assert 16 < int((mask.flatten(1).amax(1) > 0).sum()) < 48  # about half the images


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shade_ratio": 1.5}, "shade_ratio"),
        ({"shade_gain": (0.5, 2.0)}, "shade_gain"),
        ({"scar_probability": -0.1}, "scar_probability"),
        ({"scar_width": (4.0, 2.0)}, "scar_width"),
        ({"scar_length": (0.0, 8.0)}, "scar_length"),
    ],
)
def test_bad_corruption_arguments_get_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Corruption(**kwargs)


def test_a_non_finite_synthetic_anomaly_leaves_its_image_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    """anomalib's texture augmenters can return NaN pixels (torchvision's hue jitter below 0): never pass them on."""
    torch.manual_seed(0)
    model = untrained_tdad(perlin_probability=1.0, mask_probability=0.0, scar_probability=0.0)
    perlin = model.corruption.perlin.forward

    def nan_in_second_image(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        corrupted, mask = perlin(pixels)
        corrupted[1, :, :3, :2] = float("nan")
        return corrupted, mask

    monkeypatch.setattr(model.corruption.perlin, "forward", nan_in_second_image)
    images = (torch.rand(3, 3, 64, 64) - model.corruption.mean) / model.corruption.std
    corrupted, mask = model.corruption(images)
    assert torch.isfinite(corrupted).all()
    assert torch.allclose(corrupted[1], images[1], atol=1e-5) and mask[1].sum() == 0
    assert mask[0].sum() > 0 and mask[2].sum() > 0  # the others keep their anomalies
    assert not torch.allclose(corrupted[0], images[0], atol=1e-3)


def test_hyper_parameters_are_saved_for_the_cli_and_checkpoints() -> None:
    model = untrained_tdad(lambda_dmd=0.0, margin=0.3)
    assert model.hparams["lambda_dmd"] == 0.0 and model.hparams["margin"] == 0.3
    assert model.hparams["backbone"] == "resnet18"


@pytest.mark.filterwarnings("ignore:`max_epochs` was not set")  # the case under test: Lightning warns
def test_training_length_defaults_to_default_epochs_only_when_unset(tiny_root) -> None:
    def epochs_trained(**trainer_kwargs: int) -> int:
        model = untrained_tdad(default_epochs=2)
        datamodule = tiny_datamodule(tiny_root, batch_size=8)
        trainer = quiet_trainer(model, limit_train_batches=1, limit_val_batches=1, **trainer_kwargs)
        trainer.fit(model, datamodule=datamodule)
        return trainer.current_epoch

    assert epochs_trained() == 2
    assert epochs_trained(max_epochs=3) == 3
    assert epochs_trained(max_steps=1) == 1


class RecordRate(Callback):
    """Records the learning rate each training step runs at."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def cosine(rate: float, step: int, steps: int) -> float:
    return rate * (1 + math.cos(math.pi * min(step, steps) / steps)) / 2


@pytest.mark.filterwarnings("ignore:`max_epochs` was not set")  # the default_epochs case: Lightning warns
@pytest.mark.parametrize(
    ("schedule", "trainer_kwargs"),
    [
        ("cosine", {}),
        ("cosine", {"max_epochs": 3}),
        ("cosine", {"max_epochs": 2, "accumulate_grad_batches": 2}),
        ("constant", {"max_epochs": 2}),
    ],
)
def test_the_learning_rate_follows_lr_schedule_over_the_whole_training(
    tiny_root, schedule: str, trainer_kwargs: dict[str, int]
) -> None:
    """The cosine spans every optimizer step, also when ``default_epochs`` sets the length (no ``max_epochs``)."""
    model = untrained_tdad(
        lr_schedule=schedule, default_epochs=2, pre_processor=Tdad.configure_pre_processor(image_size=(64, 64))
    )
    recorder = RecordRate()
    trainer = quiet_trainer(model, recorder, limit_train_batches=2, limit_val_batches=1, **trainer_kwargs)
    trainer.fit(model, datamodule=tiny_datamodule(tiny_root, batch_size=4))
    batches = 2 * trainer_kwargs.get("max_epochs", 2)
    steps = batches // trainer_kwargs.get("accumulate_grad_batches", 1)
    rate = model.learning_rate
    expected = [cosine(rate, batch * steps // batches, steps) for batch in range(batches)]
    assert recorder.rates == pytest.approx(expected if schedule == "cosine" else [rate] * batches)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed runs save nothing
def test_a_resumed_run_trains_at_its_own_schedules_rate_from_its_first_step(tiny_root, tmp_path) -> None:
    """More epochs: the cosine of the new length from the first resumed step; fewer: 0 past the cosine's end; a
    finished cosine run resumed at a constant rate: that rate, not the 0 the checkpoint saved."""

    def fit(epochs: int, schedule: str = "cosine", checkpoint: Path | None = None, batches: int = 2) -> list[float]:
        model = untrained_tdad(lr_schedule=schedule, pre_processor=Tdad.configure_pre_processor(image_size=(64, 64)))
        recorder = RecordRate()
        saver = [ModelCheckpoint(dirpath=tmp_path, save_last=True)] if checkpoint is None else []
        trainer = quiet_trainer(
            model, recorder, *saver, max_epochs=epochs, limit_train_batches=batches, limit_val_batches=1
        )
        trainer.fit(model, datamodule=tiny_datamodule(tiny_root, batch_size=4), ckpt_path=checkpoint)
        return recorder.rates

    rate = fit(1)[0]
    last = tmp_path / "last.ckpt"
    assert fit(2, checkpoint=last) == pytest.approx([cosine(rate, 2, 4), cosine(rate, 3, 4)])
    assert fit(2, checkpoint=last, batches=1) == pytest.approx([0.0])  # steps 2 of 2: past the end
    assert fit(2, "constant", checkpoint=last) == pytest.approx([rate, rate])


def test_an_unknown_lr_schedule_gets_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        untrained_tdad(lr_schedule="linear")


def test_validation_runs_every_n_epochs_and_after_the_last_one(tiny_root, tmp_path) -> None:
    validated: list[int] = []

    class RecordValidation(Callback):
        def on_validation_start(self, trainer: Trainer, pl_module: Tdad) -> None:
            validated.append(trainer.current_epoch)

    model = untrained_tdad(check_val_every_n_epoch=2, pre_processor=Tdad.configure_pre_processor(image_size=(64, 64)))
    engine = quiet_engine(
        tmp_path, max_epochs=5, limit_train_batches=1, limit_val_batches=1, callbacks=[RecordValidation()]
    )
    engine.fit(model, datamodule=tiny_datamodule(tiny_root, batch_size=8))  # anomalib's Engine: trainer_arguments
    assert validated == [1, 3, 4]  # epochs 2 and 4, and the fifth and last one
    assert engine.trainer.check_val_every_n_epoch == 2  # given back for a next fit on the same Engine

    validated.clear()
    engine = quiet_engine(
        tmp_path,
        max_epochs=None,
        max_steps=3,
        limit_train_batches=1,
        limit_val_batches=1,
        callbacks=[RecordValidation()],
    )
    engine.fit(model, datamodule=tiny_datamodule(tiny_root, batch_size=8))
    assert validated == [1]  # limited by steps: the cadence stays (no epoch is known to be the last)
    with pytest.raises(ValueError, match="check_val_every_n_epoch must be a positive"):
        untrained_tdad(check_val_every_n_epoch=0)


@pytest.mark.parametrize(
    ("backbone", "layers", "stride"),
    [
        ("wide_resnet50_2", ("layer1", "layer2", "layer3"), 32),  # RD4AD: twice the coarsest stride
        ("tf_efficientnet_lite0", ("blocks.2", "blocks.4", "blocks.6"), 32),  # coarsest level already at 32
        ("resnet18", ("layer1", "layer2"), 32),
    ],
)
def test_student_embedding_sits_at_stride_32(backbone: str, layers: tuple[str, ...], stride: int) -> None:
    model = TdadModel(backbone, layers, pre_trained=False).eval()
    embedding = model.student.bottleneck(model.teacher(torch.randn(1, 3, 128, 192)))
    assert embedding.shape[-2:] == (128 // stride, 192 // stride)


def test_level_statistics_are_the_per_position_moments_of_the_training_maps() -> None:
    from anomalib_tdad.models.tdad.anomaly_map import LevelStatistics

    torch.manual_seed(0)
    maps = [torch.rand(50, 1, 8, 8) * torch.linspace(0.1, 1, 8), torch.rand(50, 1, 4, 4) + 3]
    statistics = LevelStatistics(levels=2)
    statistics.fit([m.double().sum(dim=(0, 1)) for m in maps], [(m.double() ** 2).sum(dim=(0, 1)) for m in maps], 50)
    for moments, level_maps in zip(statistics.levels, maps, strict=True):
        torch.testing.assert_close(moments.mean[0, 0], level_maps.mean(dim=(0, 1)))
        torch.testing.assert_close(moments.std[0, 0], level_maps.std(dim=(0, 1)), atol=1e-5, rtol=1e-4)
    standardized = statistics([m[:10] for m in maps])
    assert all(abs(s.mean().item()) < 0.5 for s in standardized)
    assert all(s.shape == m[:10].shape for s, m in zip(standardized, maps, strict=True))


def test_standardized_map_peaks_at_the_defect_not_where_the_student_is_always_poor() -> None:
    """A border the student never reproduces well dominates the raw map; standardization removes it."""
    from anomalib_tdad.models.tdad.anomaly_map import LevelStatistics

    torch.manual_seed(0)
    normal = torch.rand(40, 1, 16, 16) * 0.05 + 0.1
    normal[..., :, 0] += 0.5  # the student is always poor at the left border
    test = torch.rand(1, 1, 16, 16) * 0.05 + 0.1
    test[..., :, 0] += 0.5
    test[..., 8, 8] += 0.3  # a defect, weaker than the border in raw distance
    statistics = LevelStatistics(levels=1)
    statistics.fit([normal.double().sum(dim=(0, 1))], [(normal.double() ** 2).sum(dim=(0, 1))], len(normal))
    assert test.flatten().argmax().item() % 16 == 0  # raw: the border wins
    assert statistics([test])[0].flatten().argmax().item() == 8 * 16 + 8  # standardized: the defect wins


def test_map_statistics_are_fitted_after_training_and_restored_from_the_checkpoint(tiny_root, tmp_path) -> None:
    kwargs = {"backbone": "resnet18", "layers": ("layer1", "layer2", "layer3"), "pre_trained": False}
    model = Tdad(**kwargs, pre_processor=Tdad.configure_pre_processor(image_size=(64, 64)))
    datamodule = tiny_datamodule(tiny_root, batch_size=8)
    trainer = quiet_trainer(model, max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=datamodule)
    statistics = model.model.anomaly_map_generator.statistics
    shapes = [tuple(moments.mean.shape) for moments in statistics.levels]
    assert shapes == [(1, 1, 16, 16), (1, 1, 8, 8), (1, 1, 4, 4)]  # strides 4, 8, 16 of a 64 px input
    assert all(moments.std.min() > 0 for moments in statistics.levels)

    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = Tdad.load_from_checkpoint(tmp_path / "model.ckpt").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = model.eval().model(images), restored.model(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)

    raw = Tdad(**kwargs, standardize=False).eval()
    raw.model.student.load_state_dict(model.model.student.state_dict())
    with torch.no_grad():
        assert not torch.allclose(raw.model(images).anomaly_map, expected.anomaly_map)


def test_map_statistics_pass_honours_limit_train_batches_and_restores_train_mode(
    tiny_root, tmp_path, monkeypatch
) -> None:
    from anomalib_tdad.models.tdad.anomaly_map import LevelStatistics

    counts: list[int] = []
    fit = LevelStatistics.fit
    monkeypatch.setattr(
        LevelStatistics, "fit", lambda self, s, q, count: (counts.append(count), fit(self, s, q, count))
    )
    model = untrained_tdad(pre_processor=Tdad.configure_pre_processor(image_size=(64, 64)))
    datamodule = tiny_datamodule(tiny_root, batch_size=2)
    trainer = quiet_trainer(model, max_epochs=1, limit_train_batches=2, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=datamodule)
    assert counts and set(counts) == {4}  # 2 batches of 2, not the 16 training images

    def broken() -> Iterator[torch.Tensor]:
        yield torch.rand(2, 3, 64, 64)
        raise RuntimeError("boom")

    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        model.model.fit_statistics(broken())
    assert model.model.training  # the failed pass did not leave the model in eval mode


@pytest.mark.parametrize("weights_only", [False, True])
def test_map_statistics_are_refitted_for_validations_and_written_checkpoints_only(
    tiny_root, tmp_path, weights_only: bool
) -> None:
    """Validated every 5 epochs over 4 epochs, checkpointed every second epoch: refits for the checkpoint after
    epoch 2 and the final validation (its checkpoint reuses them), not after every epoch; each checkpoint holds the
    statistics of its weights, weights-only checkpoints too."""
    model = untrained_tdad(pre_processor=Tdad.configure_pre_processor(image_size=(64, 64)))
    fitted: dict[int, torch.Tensor] = {}  # global step of each refit: the first level's std it gave
    fit = model.model.fit_statistics

    def counted_fit(*args: Any) -> None:
        fit(*args)
        fitted[trainer.global_step] = model.model.anomaly_map_generator.statistics.levels[0].std.clone()

    model.model.fit_statistics = counted_fit
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path, every_n_epochs=2, save_top_k=-1, filename="{epoch}", save_weights_only=weights_only
    )
    trainer = quiet_trainer(
        model,
        checkpoints,
        max_epochs=4,
        check_val_every_n_epoch=5,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=tiny_datamodule(tiny_root, batch_size=2))
    assert list(fitted) == [4, 8]  # end of epoch 2 (checkpoint), end of epoch 4 (validation); 2 steps per epoch
    for epoch, step in ((1, 4), (3, 8)):
        state = torch.load(tmp_path / f"epoch={epoch}.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        torch.testing.assert_close(state["model.anomaly_map_generator.statistics.levels.0.std"], fitted[step])
    assert not torch.equal(fitted[4], fitted[8])


def test_step_checkpoints_do_not_change_what_is_trained(tiny_root, tmp_path) -> None:
    """A checkpoint inside an epoch refits the statistics with a pass over the (shuffled) training images; the pass
    must not move the random stream the epoch's remaining anomalies are drawn from."""
    from lightning.pytorch import seed_everything

    def train(*callbacks: Callback) -> dict[str, torch.Tensor]:
        seed_everything(0)
        model = untrained_tdad(pre_processor=Tdad.configure_pre_processor(image_size=(64, 64)))
        trainer = quiet_trainer(
            model,
            *callbacks,
            max_epochs=2,
            check_val_every_n_epoch=5,
            limit_train_batches=4,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
        )
        trainer.fit(model, datamodule=tiny_datamodule(tiny_root, batch_size=2))
        return model.model.student.state_dict()

    plain = train()
    checkpointed = train(ModelCheckpoint(tmp_path / "steps", every_n_train_steps=1, save_top_k=-1))
    assert len(list((tmp_path / "steps").glob("*.ckpt"))) == 8
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, msg=name)


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")  # the case
def test_a_run_resumed_in_its_last_epoch_from_a_step_checkpoint_still_validates(tiny_root, tmp_path) -> None:
    """Lightning does not start a resumed epoch again: the final-epoch validation is set at the start of training."""

    class Validations(Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_validation_start(self, trainer: Trainer, pl_module: Tdad) -> None:
            self.steps.append(trainer.global_step)

    def fit(ckpt_path: Path | None = None) -> list[int]:
        model = untrained_tdad(pre_processor=Tdad.configure_pre_processor(image_size=(64, 64)))
        validations = Validations()
        checkpoints = ModelCheckpoint(tmp_path / "checkpoints", every_n_train_steps=5, save_top_k=-1)
        trainer = quiet_trainer(
            model,
            checkpoints,
            validations,
            max_epochs=3,
            check_val_every_n_epoch=5,
            limit_train_batches=4,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
        )
        trainer.fit(model, datamodule=tiny_datamodule(tiny_root, batch_size=2), ckpt_path=ckpt_path)
        return validations.steps

    assert fit() == [12]  # the last epoch validates: 3 epochs of 4 steps
    checkpoint = (tmp_path / "checkpoints" / "epoch=2-step=10.ckpt").rename(tmp_path / "killed.ckpt")
    shutil.rmtree(tmp_path / "checkpoints")
    assert fit(checkpoint) == [12]  # resumed after the second of the last epoch's 4 steps


def test_weights_to_download_wait_for_training_and_a_checkpoint_makes_them_unnecessary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backbone whose weights are not on disk builds without touching the network; a state dict fills it."""
    from anomalib_tdad import weights

    def no_network(*_: Any) -> None:
        pytest.fail("the network was probed")

    monkeypatch.setattr(weights, "pretrained_weights_cached", lambda _: False)
    monkeypatch.setattr(weights, "_reachable", no_network)
    monkeypatch.setattr("anomalib_tdad.models.tdad.torch_model.pretrained_weights_cached", lambda _: False)
    model = Tdad(backbone="resnet18", pre_trained=True).eval()
    assert model.model.weights_pending
    with pytest.raises(RuntimeError, match="not loaded yet"):
        model.model(torch.rand(1, 3, 64, 64))
    model.load_state_dict(Tdad(backbone="resnet18", pre_trained=False).state_dict())
    assert not model.model.weights_pending
    assert model.model(torch.rand(1, 3, 64, 64)).anomaly_map.shape == (1, 1, 64, 64)


def test_a_checkpoint_of_version_0_1_loads_and_scores_the_same(tiny_root, tmp_path) -> None:
    """0.1 saved the statistics as ``statistics.mean_0`` ... and the 2-D blur kernel; both still load."""
    from anomalib.models.components import GaussianBlur2d

    model = untrained_tdad(pre_processor=Tdad.configure_pre_processor(image_size=(64, 64)))
    datamodule = tiny_datamodule(tiny_root, batch_size=8)
    trainer = quiet_trainer(model, max_epochs=1, limit_train_batches=1, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    prefix = "model.anomaly_map_generator."
    for level in range(3):
        for name in ("mean", "std"):
            state[f"{prefix}statistics.{name}_{level}"] = state.pop(f"{prefix}statistics.levels.{level}.{name}")
    state[f"{prefix}blur.kernel"] = GaussianBlur2d(sigma=4.0, channels=1, kernel_size=33).kernel
    torch.save(checkpoint, tmp_path / "old.ckpt")

    restored = Tdad.load_from_checkpoint(tmp_path / "old.ckpt").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored.model(images).anomaly_map, model.eval().model(images).anomaly_map)


@pytest.mark.parametrize(
    ("layers", "legacy", "fix"),
    [  # 0.4's default levels were at strides 8 and 16; its embedding was twice as wide as the last level
        (None, {"layers": ["layer2", "layer3"], "embedding_dim": 512}, '--model.layers "[layer2,layer3]"'),
        (["layer2", "layer3", "layer4"], {"embedding_dim": 1024}, "--model.embedding_dim 1024"),
    ],
)
def test_a_checkpoint_of_version_0_4_builds_the_network_it_was_trained_with(
    tiny_root, tmp_path, layers: list[str] | None, legacy: dict[str, Any], fix: str
) -> None:
    """0.4 saved its defaults as ``layers=None`` and ``embedding_dim=None``, which now select other ones:
    ``load_from_checkpoint`` builds the old network; a model built with today's defaults refuses it, naming them."""
    from anomalib_tdad.checkpoint import IncompatibleCheckpointError

    old_layers = legacy.get("layers", layers)
    model = Tdad(
        backbone="resnet18",
        layers=old_layers,
        embedding_dim=legacy["embedding_dim"],
        pre_trained=False,
        pre_processor=Tdad.configure_pre_processor(image_size=(64, 64)),
    )
    trainer = quiet_trainer(model, max_epochs=1, limit_train_batches=1, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=tiny_datamodule(tiny_root, batch_size=8))
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    checkpoint["hyper_parameters"].update(layers=layers, embedding_dim=None)  # as 0.4 wrote them
    assert checkpoint["hyper_parameters"].pop("scar_probability") == 0.5  # 0.4 to 0.6 had no scars
    torch.save(checkpoint, tmp_path / "old.ckpt")

    restored = Tdad.load_from_checkpoint(tmp_path / "old.ckpt").eval()
    assert (restored.model.layers, restored.model.student.embedding_dim) == (old_layers, legacy["embedding_dim"])
    assert restored.corruption.scar_probability == 0.0  # it trains on as it was trained
    assert Tdad.load_from_checkpoint(tmp_path / "new.ckpt").corruption.scar_probability == 0.5
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored.model(images).anomaly_map, model.eval().model(images).anomaly_map)
    today = Tdad(backbone="resnet18", layers=layers, pre_trained=False)
    with pytest.raises(IncompatibleCheckpointError, match=re.escape(fix)):
        today.on_load_checkpoint(torch.load(tmp_path / "old.ckpt", weights_only=False))


def test_separable_blur_equals_anomalibs_2d_gaussian_blur() -> None:
    from anomalib.models.components import GaussianBlur2d

    from anomalib_tdad.models.tdad.anomaly_map import SeparableGaussianBlur

    maps = torch.rand(2, 1, 80, 96)
    for sigma in (1.0, 4.0, 6.5):
        expected = GaussianBlur2d(sigma=sigma, channels=1, kernel_size=2 * int(4 * sigma + 0.5) + 1)(maps)
        for max_matrix_size in (512, 64):  # matrix products; 1-D convolutions (a side above 64)
            blurred = SeparableGaussianBlur(sigma, max_matrix_size=max_matrix_size)(maps)
            torch.testing.assert_close(blurred, expected, atol=1e-6, rtol=1e-5)


def test_the_teacher_feature_cache_skips_seen_images_and_changes_no_feature() -> None:
    model = TdadModel("resnet18", BACKBONES["resnet18"], pre_trained=False, teacher_cache_mb=64).train()
    batches: list[int] = []
    model.teacher.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))
    images, others = torch.randn(4, 3, 64, 64), torch.randn(2, 3, 64, 64)
    model(images)
    teacher, _ = model(images[:2], others)  # seen images come from the cache; the corrupted view is not stored
    assert batches == [4, 2]
    fresh = model.teacher(torch.cat([images[:2], others]))
    for cached, computed in zip(teacher, fresh, strict=True):
        torch.testing.assert_close(cached, computed)
    # in the teacher's layout: the student rounds the same numbers differently in another one (a resumed run, which
    # starts with an empty cache, would then drift from the uninterrupted run)
    for features in (model(images)[0], *model.teacher_cache.batches(3)):
        assert all(level.is_contiguous(memory_format=torch.channels_last) for level in features)
    assert len(model.teacher_cache.entries) == 4  # ``others`` were looked up, not stored

    assert copy.deepcopy(model).teacher_cache.entries == {}  # exports and copies do not carry it
    model.load_state_dict(model.state_dict())  # e.g. a checkpoint: the teacher may have changed
    assert model.teacher_cache.entries == {}
    small = TdadModel("resnet18", BACKBONES["resnet18"], pre_trained=False, teacher_cache_mb=0).train()
    small(images)
    assert small.teacher_cache.entries == {}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 features must not come back in a float32 pass
        model(images)
    assert model.teacher_cache.entries == {}


def test_map_statistics_from_cached_features_equal_those_from_the_images() -> None:
    model = TdadModel("resnet18", BACKBONES["resnet18"], pre_trained=False, teacher_cache_mb=64).train()
    images = torch.randn(6, 3, 64, 64)
    model(images[:4])
    model(images[4:])  # the training epoch: every image stored once
    reference = copy.deepcopy(model)  # the same networks, an empty cache switched off: fresh teacher passes
    reference.teacher_cache.max_bytes = 0
    reference.fit_statistics(images.split(4))
    model.fit_statistics(model.teacher_cache.batches(5))  # other batches, features from the cache
    for ours, theirs in zip(
        model.anomaly_map_generator.statistics.levels, reference.anomaly_map_generator.statistics.levels, strict=True
    ):
        torch.testing.assert_close(ours.mean, theirs.mean)
        torch.testing.assert_close(ours.std, theirs.std)
    assert not model.teacher_cache.full
    tiny = TdadModel("resnet18", BACKBONES["resnet18"], pre_trained=False, teacher_cache_mb=1).train()
    many = torch.randn(12, 3, 64, 64)  # 112 KiB of features each
    tiny(many)  # 1 MiB holds 9: the cache says it left images out
    assert tiny.teacher_cache.full and 0 < len(tiny.teacher_cache) < len(many)


def test_the_statistics_refit_reads_the_cache_once_it_holds_the_training_set(
    tiny_root, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once an epoch has added nothing to the cache, the refit loads no image and runs no teacher pass."""
    refits: list[list[str]] = []  # per validation: what its statistics refit loaded or computed
    inside = [False]

    class WatchRefit(Callback):  # its hooks run before the model's on_validation_start, which refits
        def on_validation_start(self, trainer: Trainer, pl_module: Tdad) -> None:
            refits.append([])
            inside[0] = True

        def on_validation_batch_start(self, trainer: Trainer, pl_module: Tdad, *args: Any) -> None:
            inside[0] = False

    def watch(record: str) -> None:
        if inside[0]:
            refits[-1].append(record)

    datamodule = tiny_datamodule(tiny_root, batch_size=4)
    datamodule.setup("fit")
    get_item = type(datamodule.train_data).__getitem__

    def watched_get_item(dataset: Any, index: int) -> Any:
        if dataset is datamodule.train_data:
            watch("image")
        return get_item(dataset, index)

    monkeypatch.setattr(type(datamodule.train_data), "__getitem__", watched_get_item)
    loaded = ["image"] * 16  # a pass over the 16 training images
    for cache_mb, expected in [(64, [loaded, []]), (0, [loaded + ["teacher"] * 4] * 2)]:
        refits.clear()
        model = untrained_tdad(
            pre_processor=Tdad.configure_pre_processor(image_size=(64, 64)),
            teacher_cache_mb=cache_mb,
            check_val_every_n_epoch=1,
        )
        model.model.teacher.register_forward_hook(lambda *args: watch("teacher"))
        engine = quiet_engine(tmp_path, max_epochs=2, limit_val_batches=1, callbacks=[WatchRefit()])
        engine.fit(model, datamodule=datamodule)
        assert [sorted(refit) for refit in refits] == expected, cache_mb  # first epoch: the cache was filling
        assert model.model.teacher_cache.entries == {}  # freed after fitting


def test_training_with_the_feature_cache_follows_training_without_it() -> None:
    images = torch.randn(4, 3, 64, 64)

    def losses(cache_mb: int) -> list[float]:
        torch.manual_seed(0)
        model = untrained_tdad(  # float32: bf16 rounding would amplify the last digits that batch composition moves
            teacher_cache_mb=cache_mb, pre_processor=Tdad.configure_pre_processor(image_size=64), bf16_student=False
        )
        optimizer = model.configure_optimizers()
        values = []
        for _ in range(3):
            loss, _ = model.compute_loss(images)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            values.append(loss.item())
        return values

    cached, uncached = losses(64), losses(0)
    assert cached[-1] < cached[0]
    assert cached == pytest.approx(uncached, rel=1e-3)  # batch composition moves the last digits only


def test_an_image_that_drew_no_anomaly_stays_the_same_tensor() -> None:
    corruption = Corruption(perlin_probability=0.0, mask_probability=0.0, scar_probability=0.0)
    images = torch.randn(3, 3, 32, 32)
    corrupted, mask = corruption(images)
    assert mask.amax() == 0
    assert torch.equal(corrupted, images)
