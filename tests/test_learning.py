"""After a short fit on tiny normal data, the map lights up where the planted defects are."""

import torch
from conftest import Trained


def test_anomaly_map_is_higher_inside_planted_defects(trained: Trained) -> None:
    predictions = trained.engine.predict(model=trained.model, dataloaders=trained.datamodule.test_dataloader())
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
