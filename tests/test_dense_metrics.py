"""Surface-normal and dense-regression metrics on literal values (multimae/metrics.py, MetricSums in evaluate.py)."""

import math

import pytest
import torch

from multimae import metrics
from multimae.train.evaluate import MetricSums, to_prediction


def normals(*vectors) -> torch.Tensor:
    """(1, 3, 1, n) from n literal 3-vectors: one image, one row of pixels."""
    return torch.tensor(vectors, dtype=torch.float32).T[None, :, None, :]


UP = (0.0, 0.0, 1.0)


def test_angles_at_0_45_90_180_degrees_whatever_the_prediction_length():
    target = normals(UP, UP, UP, UP)
    unit = normals((0, 0, 1), (1 / math.sqrt(2), 0, 1 / math.sqrt(2)), (1, 0, 0), (0, 0, -1))
    scaled = normals((0, 0, 5), (3, 0, 3), (0.1, 0, 0), (0, 0, -0.02))
    for pred in (unit, scaled):
        assert metrics.angular_errors_deg(pred, target).tolist() == pytest.approx([0, 45, 90, 180], abs=1e-9)
    # the target need not be unit length either
    assert metrics.angular_errors_deg(unit, 7 * target).tolist() == pytest.approx([0, 45, 90, 180], abs=1e-9)


def test_small_angles_are_accurate():
    # 1e-6 rad: acos(cos) in float32 would round to 0; atan2(|cross|, dot) keeps it
    angle = metrics.angular_errors_deg(normals((1e-6, 0, 1)), normals(UP))
    assert angle.item() == pytest.approx(math.degrees(1e-6), rel=1e-6)


def test_missing_targets_are_left_out_and_directionless_predictions_count_as_90():
    target = normals(UP, (0, 0, 0), (float("nan"), 0, 1), (0, float("inf"), 0), UP, UP)
    pred = normals(UP, UP, UP, UP, (0, 0, 0), (float("nan"), 0, 0))
    # pixels 1-3 have no usable target; 4 and 5 predict no direction
    assert metrics.angular_errors_deg(pred, target).tolist() == pytest.approx([0, 90, 90])
    valid = torch.tensor([[[False, True, True, True, True, True]]])  # (1, 1, 6): also drops pixel 0
    assert metrics.angular_errors_deg(pred, target, valid).tolist() == pytest.approx([90, 90])


def test_mean_and_within_on_literal_angles():
    scores = metrics.normal_scores(metrics.normal_sums(torch.tensor([5.0, 11.25, 15.0, 25.0, 40.0])))
    assert scores["mean_angle_deg"] == pytest.approx(96.25 / 5)
    assert scores["within_11.25"] == pytest.approx(1 / 5)  # strictly under: 11.25 itself is out
    assert scores["within_22.5"] == pytest.approx(3 / 5)
    assert scores["within_30"] == pytest.approx(4 / 5)


def test_median_is_within_the_histogram_resolution():
    scores = metrics.normal_scores(metrics.normal_sums(torch.tensor([170.0, 3.0, 50.0, 12.34, 7.5])))
    assert scores["median_angle_deg"] == pytest.approx(12.34, abs=metrics.ANGLE_BIN_DEG)
    angles = torch.rand(10001, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 180
    scores = metrics.normal_scores(metrics.normal_sums(angles))
    assert scores["median_angle_deg"] == pytest.approx(angles.median().item(), abs=metrics.ANGLE_BIN_DEG)
    # 180 degrees exactly lands in the last bin
    assert metrics.normal_scores(metrics.normal_sums(torch.tensor([180.0])))["median_angle_deg"] <= 180.0


def test_an_empty_set_scores_zero():
    assert metrics.normal_scores(torch.zeros(metrics.NORMAL_SUMS_SIZE))["median_angle_deg"] == 0.0
    assert metrics.dense_scores(torch.zeros(4)) == {"L1": 0.0, "RMSE": 0.0}


def test_dense_l1_and_rmse_leave_out_a_nan_target():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)
    target = torch.tensor([[[1.0, 4.0], [float("nan"), 0.0]]])
    sums = metrics.dense_error_sums(pred, target)
    # errors 0, -2, 4 over three valid pixels
    assert sums.tolist() == [6.0, 20.0, 3.0, 3.0]
    assert metrics.dense_scores(sums) == pytest.approx({"L1": 2.0, "RMSE": math.sqrt(20 / 3)})


def test_dense_pools_every_channel_of_a_pixel_whose_target_is_finite():
    pred = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[[1.0, 5.0]], [[3.0, float("nan")]]]])  # (1, 2, 1, 2): pixel 1 misses a channel
    sums = metrics.dense_error_sums(pred, target)
    assert sums.tolist() == [4.0, 10.0, 2.0, 1.0]  # values 1 and 3 of pixel 0 only


def random_normals(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(4, 3, 5, 6, generator=g), torch.randn(4, 3, 5, 6, generator=g)
    target[:, :, 0] = 0.0  # a missing row in every image
    target[1, 2, 3, 4] = float("nan")
    return pred, target


def test_sums_of_two_halves_equal_the_whole_batch():
    pred, target = random_normals(0)
    for family, p, t in (("normals", pred, target), ("dense", pred[:, :2], target[:, :2])):
        whole, first, second = MetricSums(family), MetricSums(family), MetricSums(family)
        whole.update(p, t)
        first.update(p[:2], t[:2])
        second.update(p[2:], t[2:])
        first.sums += second.sums  # what all_reduce does across ranks
        assert first.compute() == pytest.approx(whole.compute())


def test_metric_sums_normals_report_percent_and_pixels():
    target = normals(UP, UP, UP, UP, (0, 0, 0))
    pred = normals((0, 0, 1), (0.1, 0, 1), (1, 0, 1), (1, 0, 0), UP)
    sums = MetricSums("normals")
    sums.update(pred, target)
    out = sums.compute()
    assert set(out) == {"mean_angle_deg", "median_angle_deg", "within_11.25", "within_22.5", "within_30", "pixels"}
    assert out["pixels"] == 4
    assert out["within_11.25"] == pytest.approx(50.0)  # 0 and 5.7 degrees
    assert out["within_30"] == pytest.approx(50.0)  # 45 and 90 are out
    assert out["mean_angle_deg"] == pytest.approx((0 + math.degrees(math.atan(0.1)) + 45 + 90) / 4)


def test_metric_sums_dense_fits_a_one_channel_prediction_to_its_target():
    output = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 4.0], [float("nan"), 0.0]]]])
    pred = to_prediction("dense", output)
    assert pred.shape == (1, 2, 2)
    sums = MetricSums("dense")
    sums.update(pred, target)  # (B, H, W) against (B, 1, H, W)
    assert sums.compute() == pytest.approx({"L1": 2.0, "RMSE": math.sqrt(20 / 3), "pixels": 3})


def test_to_prediction_keeps_normals_and_multichannel_outputs():
    assert to_prediction("normals", torch.zeros(2, 3, 4, 4)).shape == (2, 3, 4, 4)
    assert to_prediction("dense", torch.zeros(2, 2, 4, 4)).shape == (2, 2, 4, 4)
    assert to_prediction("dense", torch.zeros(2, 4, 4)).shape == (2, 4, 4)
    assert to_prediction("depth", torch.zeros(2, 1, 4, 4)).shape == (2, 4, 4)


def test_existing_families_still_work():
    depth = MetricSums("depth")
    depth.update(torch.tensor([[[1.2, 2.0], [2.0, 9.0]]]), torch.tensor([[[1.0, 2.0], [4.0, 0.0]]]))
    assert depth.compute() == pytest.approx(
        {"delta1": 200 / 3, "AbsRel": (0.2 + 0 + 0.5) / 3, "RMSE": (4.04 / 3) ** 0.5, "images": 1}
    )
    semseg = MetricSums("semseg", num_classes=3)
    semseg.update(torch.tensor([[[0, 1, 1, 2]]]), torch.tensor([[[0, 0, 1, 255]]]))
    assert semseg.compute() == pytest.approx({"mIoU": 50.0, "pixel_acc": 200 / 3, "pixels": 3})
    with pytest.raises(ValueError, match="no metric"):
        MetricSums("edges")
