"""Multi-modal masking (MultiMAE paper, Sec. 3.2).

Per sample, a Dirichlet(alpha) draw splits a fixed budget of visible tokens (paper: 98 of the
588 tokens of three 224 px modalities) across the input modalities; inside each modality the
visible tokens are chosen uniformly at random. Everything here is a pure function of tensors and
an optional `torch.Generator`:

    p = dirichlet_proportions(B, T, alphas, sample_tasks_uniformly, generator)   # (B, T)
    counts = split_budget(p, budget, capacity)                                  # (B, T), rows sum to budget
    mask = select_visible(counts, num_tokens, generator)                        # (B, N), 1 = masked
    ids_keep, ids_restore, keep_valid = mask_to_ids(mask)

Unlike the official code, rounding never changes the budget (largest-remainder rounding with
per-modality capacity), and user-given masks with different visible counts per sample are
supported: `ids_keep` is padded to the largest count and `keep_valid` marks the padding, which
the encoder and decoders exclude from attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def dirichlet_proportions(
    batch: int,
    num_tasks: int,
    alphas: float | Sequence[float] = 1.0,
    sample_tasks_uniformly: bool = False,
    generator: torch.Generator | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Sample (B, T) float64 task proportions, each row ~ Dirichlet(alphas) (CPU tensor).

    With `sample_tasks_uniformly`, each sample first picks a non-empty subset of tasks uniformly
    (as official: alpha * {0, 1} + eps), then draws the Dirichlet over that subset. The draw is
    seeded from `generator` (or torch's global RNG), so `torch.manual_seed` makes it reproducible.
    """
    a = np.asarray(alphas, dtype=np.float64)
    if a.ndim == 0:
        a = np.full(num_tasks, float(a))
    if a.shape != (num_tasks,) or (a <= 0).any():
        raise ValueError(f"alphas must be positive, one per input task ({num_tasks}), got {alphas}")
    seed = int(
        torch.randint(
            0, 2**62, (1,), generator=generator, device=generator.device if generator is not None else "cpu"
        ).item()
    )
    rng = np.random.default_rng(seed)
    conc = np.broadcast_to(a, (batch, num_tasks)).copy()
    if sample_tasks_uniformly:
        subset = rng.integers(1, 2**num_tasks, size=batch)  # a non-empty subset per sample
        chosen = (subset[:, None] >> np.arange(num_tasks)) & 1
        conc = chosen * conc + eps
    gammas = rng.standard_gamma(conc)  # Dirichlet = normalized Gamma(alpha_i, 1) draws
    total = gammas.sum(axis=1, keepdims=True)
    dead = total[:, 0] == 0  # every draw underflowed (tiny alphas): the limit is one-hot
    if dead.any():
        gammas[dead] = np.eye(num_tasks)[np.argmax(conc[dead] * rng.random(conc[dead].shape), axis=1)]
        total = gammas.sum(axis=1, keepdims=True)
    return torch.from_numpy(gammas / total)


def split_budget(proportions: torch.Tensor, budget: int, capacity: Sequence[int]) -> torch.Tensor:
    """(B, T) proportions -> (B, T) int64 counts with every row summing to exactly `budget`.

    Largest-remainder rounding of `proportions * budget`, so each count is within 1 of its share
    unless a task's capacity (its number of tokens) caps it; the overflow then goes to the tasks
    furthest below their share that still have room.
    """
    cap = torch.as_tensor(list(capacity), dtype=torch.float64, device=proportions.device)
    if budget > int(cap.sum()) or budget < 0:
        raise ValueError(
            f"num_encoded_tokens={budget} must be in [0, {int(cap.sum())}] "
            f"(the input tasks have {list(capacity)} tokens)"
        )
    raw = proportions.double() * budget  # (B, T)
    counts = torch.minimum(raw.floor(), cap)
    # 1) one extra token for each of the `deficit` largest remainders (tasks with room only)
    deficit = budget - counts.sum(1, keepdim=True)
    room = cap - counts
    key = torch.where(room > 0, raw - counts, torch.full_like(raw, -1.0))
    rank = key.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    counts = counts + ((rank < deficit) & (room > 0)).double()
    # 2) capacity overflow: fill remaining room in order of distance below the share
    deficit = budget - counts.sum(1, keepdim=True)
    room = cap - counts
    order = torch.where(room > 0, raw - counts, torch.full_like(raw, -float("inf"))).argsort(
        dim=1, descending=True, stable=True
    )
    room_sorted = room.gather(1, order)
    before = room_sorted.cumsum(1) - room_sorted
    add_sorted = (deficit - before).clamp(min=0).minimum(room_sorted)
    counts = counts.scatter_add(1, order, add_sorted)
    return counts.long()


def select_visible(
    counts: torch.Tensor,
    num_tokens: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, T) counts -> (B, sum(num_tokens)) int64 mask, 0 = visible, 1 = masked.

    In task t's segment exactly counts[:, t] tokens, chosen uniformly at random, are visible.
    """
    B, T = counts.shape
    device = torch.device(device) if device is not None else counts.device
    sizes = torch.as_tensor(list(num_tokens), device=device)
    task_id = torch.repeat_interleave(torch.arange(T, device=device), sizes)  # (N,)
    start = torch.cumsum(sizes, 0) - sizes  # (T,)
    noise = torch.rand(
        B, int(sizes.sum()), generator=generator, device=generator.device if generator is not None else device
    ).to(device)
    # random order inside each task's segment: ranks of noise + task index over the whole row
    rank = (noise + task_id).argsort(dim=1).argsort(dim=1) - start[task_id]  # (B, N)
    visible = rank < counts.to(device)[:, task_id]
    return (~visible).long()


def mask_to_ids(
    mask: torch.Tensor, num_visible: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, N) mask (0 = visible) -> ids_keep (B, K), ids_restore (B, N), keep_valid (B, K) | None.

    `ids_shuffle = argsort(mask, stable)` lists visible tokens first, in sequence order;
    `ids_restore` is its inverse permutation. K is the largest visible count in the batch
    (pass `num_visible` when every row is known to have that many, which skips a device sync);
    `keep_valid` is None when all rows have K visible tokens, else False at padded places.
    """
    ids_shuffle = torch.argsort(mask, dim=1, stable=True)  # (B, N)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    keep_valid = None
    if num_visible is None:
        n_vis = (mask == 0).sum(1)  # (B,)
        num_visible = int(n_vis.max())
        if not bool((n_vis == num_visible).all()):
            keep_valid = torch.arange(num_visible, device=mask.device)[None, :] < n_vis[:, None]
    return ids_shuffle[:, :num_visible], ids_restore, keep_valid


def random_masks(
    num_tokens: dict[str, int],
    batch: int,
    num_encoded_tokens: int,
    alphas: float | Sequence[float] = 1.0,
    sample_tasks_uniformly: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Sample the per-task masks for one batch: ({task: (B, n_t) int64, 1 = masked}, ids_keep, ids_restore)."""
    sizes = list(num_tokens.values())
    p = dirichlet_proportions(batch, len(sizes), alphas, sample_tasks_uniformly, generator)
    counts = split_budget(p, num_encoded_tokens, sizes)
    mask = select_visible(counts, sizes, generator, device)
    ids_keep, ids_restore, _ = mask_to_ids(mask, num_visible=num_encoded_tokens)
    return dict(zip(num_tokens, mask.split(sizes, dim=1))), ids_keep, ids_restore
