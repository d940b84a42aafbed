"""The metrics module on literal values (multimae/metrics.py): every score the toolkit reports comes from here."""

import pytest
import torch

from multimae import metrics


def test_depth_errors_of_one_image():
    target = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # the 0 is a missing pixel
    pred = torch.tensor([[1.2, 2.0], [2.0, 9.0]])
    e = metrics.depth_errors(pred, target)
    # valid pixels: ratios 1.2, 1.0, 2.0 -> two of three under 1.25
    assert e["delta1"] == pytest.approx(2 / 3)
    assert e["AbsRel"] == pytest.approx((0.2 / 1 + 0 + 2 / 4) / 3)
    assert e["RMSE"] == pytest.approx(((0.04 + 0 + 4) / 3) ** 0.5)
    assert metrics.depth_errors(pred, torch.zeros(2, 2)) is None


def test_depth_metrics_are_averaged_per_image_not_pooled():
    # image A: 1 valid pixel, exact; image B: 3 valid pixels, all off by 2x
    a_t, a_p = torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([[1.0, 5.0, 5.0, 5.0]])
    b_t, b_p = torch.ones(1, 4), torch.full((1, 4), 2.0)
    b_t[0, 3] = 0.0
    m = metrics.mean_depth_errors([a_p, b_p], [a_t, b_t])
    assert m["images"] == 2
    assert m["delta1"] == pytest.approx(0.5)  # (1 + 0) / 2; pooled over pixels it would be 1 / 4
    assert m["AbsRel"] == pytest.approx(0.5)  # (0 + 1) / 2


def test_scale_and_shift_alignment_recovers_an_affine_prediction():
    target = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    pred = 0.5 * target - 3.0  # relative depth: right shape, wrong scale and offset
    aligned = metrics.align_scale_shift(pred, target)
    assert torch.allclose(aligned, target, atol=1e-5)
    assert metrics.mean_depth_errors([pred], [target], align=True)["delta1"] == 1.0


def test_confusion_matrix_and_segmentation_scores():
    target = torch.tensor([[0, 0, 1, 255]])  # 255: ignored
    pred = torch.tensor([[0, 1, 1, 2]])
    cm = metrics.confusion_matrix(pred, target, num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    s = metrics.segmentation_scores(cm)
    # IoU class 0: 1 / (2 + 1 - 1) = 0.5; class 1: 1 / (1 + 2 - 1) = 0.5; class 2 absent from both: left out
    assert s["mIoU"] == pytest.approx(0.5)
    assert s["pixel_acc"] == pytest.approx(2 / 3)
    assert metrics.segmentation_scores(torch.zeros(3, 3, dtype=torch.int64)) == {"mIoU": 0.0, "pixel_acc": 0.0}


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 1, 0])
    assert metrics.topk_correct(logits, target, 1) == 1
    assert metrics.topk_correct(logits, target, 2) == 2
    assert metrics.topk_correct(logits, target, 5) == 3  # k larger than the class count: every sample
