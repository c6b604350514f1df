"""After a short fit on tiny normal data, the map lights up where the planted defects are."""

from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_tdad import Tdad
from anomalib_tdad.demo import DemoSplit, make_demo_dataset


def test_anomaly_map_is_higher_inside_planted_defects(tmp_path: Path) -> None:
    seed_everything(0)
    make_demo_dataset(tmp_path, "brick", split=DemoSplit(train=24, test_good=4, test_per_defect=4), image_size=96)
    datamodule = MVTecAD(root=tmp_path, category="brick", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = Tdad()
    engine = Engine(max_epochs=3, default_root_dir=tmp_path / "results", logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    inside, outside, good_scores, bad_scores = [], [], [], []
    for batch in predictions:
        for anomaly_map, mask, label, score in zip(
            batch.anomaly_map, batch.gt_mask, batch.gt_label, batch.pred_score, strict=True
        ):
            (bad_scores if label else good_scores).append(score.item())
            if label:
                mask = mask.bool().reshape(anomaly_map.shape[-2:])
                inside.append(anomaly_map.squeeze()[mask].mean())
                outside.append(anomaly_map.squeeze()[~mask].mean())
    inside, outside = torch.stack(inside), torch.stack(outside)
    assert len(inside) == 12
    assert (inside > outside).float().mean() >= 0.75, (inside, outside)
    assert inside.mean() > 1.5 * outside.mean()
    assert sum(bad_scores) / len(bad_scores) > sum(good_scores) / len(good_scores)
