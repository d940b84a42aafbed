"""Multi-modal masking: exact budget, Dirichlet split, random selection, ids, reproducibility."""

import numpy as np
import pytest
import torch

from multimae.masking import dirichlet_proportions, mask_to_ids, random_masks, select_visible, split_budget

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"rgb": 196, "depth": 196, "semseg": 196}


def test_every_sample_sees_exactly_the_budget_and_counts_follow_the_dirichlet_draw():
    g = torch.Generator().manual_seed(0)
    p = dirichlet_proportions(64, 3, 1.0, generator=g)
    assert p.shape == (64, 3) and torch.allclose(p.sum(1), torch.ones(64, dtype=p.dtype))
    counts = split_budget(p, 98, [196, 196, 196])
    assert counts.sum(1).tolist() == [98] * 64
    assert (counts - p * 98).abs().max() < 1.0  # largest-remainder rounding: within one token
    mask = select_visible(counts, [196, 196, 196], generator=g)
    per_task = (mask == 0).reshape(64, 3, 196).sum(-1)
    assert torch.equal(per_task, counts)


def test_capacity_caps_and_overflow_keep_the_exact_budget():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    counts = split_budget(p, 150, [100, 100, 100])
    assert counts.sum(1).tolist() == [150, 150, 150]
    assert (counts <= 100).all()
    assert counts[1].tolist() == [75, 75, 0] and counts[2].tolist() == [30, 45, 75]
    with pytest.raises(ValueError, match="num_encoded_tokens"):
        split_budget(p, 301, [100, 100, 100])


def test_dirichlet_statistics_match_the_distribution():
    alphas = [0.5, 1.0, 2.0]
    p = dirichlet_proportions(20000, 3, alphas, generator=torch.Generator().manual_seed(3)).numpy()
    a0 = sum(alphas)
    np.testing.assert_allclose(p.mean(0), np.array(alphas) / a0, atol=0.01)
    var = np.array(alphas) * (a0 - np.array(alphas)) / (a0**2 * (a0 + 1))
    np.testing.assert_allclose(p.var(0), var, rtol=0.06)


def test_sample_tasks_uniformly_drops_whole_tasks_but_keeps_the_budget():
    g = torch.Generator().manual_seed(0)
    masks, ids_keep, _ = random_masks(SIZES, 256, 98, sample_tasks_uniformly=True, generator=g)
    visible = torch.stack([(m == 0).sum(1) for m in masks.values()], 1)  # (B, 3)
    assert visible.sum(1).eq(98).all()
    n_tasks = (visible > 0).sum(1)
    # subsets are uniform over the 7 non-empty ones: single-task samples are 3/7 of the batch
    assert 0.3 < (n_tasks == 1).float().mean() < 0.56 and (n_tasks == 3).any()


def test_selection_inside_a_modality_is_uniform():
    counts = torch.full((4000, 1), 10)
    mask = select_visible(counts, [50], generator=torch.Generator().manual_seed(0))
    freq = (mask == 0).float().mean(0)  # each of the 50 tokens visible with prob 10/50
    assert (freq - 0.2).abs().max() < 0.04


def test_ids_restore_inverts_ids_shuffle_and_ids_keep_lists_the_visible_tokens():
    g = torch.Generator().manual_seed(5)
    masks, ids_keep, ids_restore = random_masks(SIZES, 8, 98, generator=g)
    mask = torch.cat(list(masks.values()), 1)
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    n = mask.shape[1]
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(n).expand(8, n))
    assert torch.equal(ids_keep, ids_shuffle[:, :98])
    assert torch.equal(torch.gather(mask, 1, ids_keep), torch.zeros(8, 98, dtype=torch.long))
    assert torch.equal(ids_keep, ids_keep.sort(1).values)  # visible tokens in sequence order


def test_masks_are_reproducible_with_a_seed():
    a = random_masks(SIZES, 4, 98, generator=torch.Generator().manual_seed(7))
    b = random_masks(SIZES, 4, 98, generator=torch.Generator().manual_seed(7))
    c = random_masks(SIZES, 4, 98, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[0][t], b[0][t]) for t in SIZES) and torch.equal(a[1], b[1])
    assert not all(torch.equal(a[0][t], c[0][t]) for t in SIZES)
    torch.manual_seed(1)
    d = random_masks(SIZES, 4, 98)
    torch.manual_seed(1)
    e = random_masks(SIZES, 4, 98)
    assert torch.equal(d[1], e[1])


def test_user_masks_with_unequal_counts_are_padded_and_flagged():
    mask = torch.tensor([[0, 1, 0, 1, 0], [1, 1, 0, 1, 1]])
    ids_keep, ids_restore, keep_valid = mask_to_ids(mask)
    assert ids_keep.tolist() == [[0, 2, 4], [2, 0, 1]]
    assert keep_valid.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(torch.argsort(ids_restore, 1)[:, :3], ids_keep)
    _, _, none = mask_to_ids(torch.tensor([[0, 1], [1, 0]]))
    assert none is None


def test_bad_alphas_are_rejected():
    with pytest.raises(ValueError, match="alphas"):
        dirichlet_proportions(2, 3, [1.0, 1.0])
    with pytest.raises(ValueError, match="alphas"):
        dirichlet_proportions(2, 3, 0.0)
