"""The training step loop (MultiMAE pre-training and fine-tuning), readable top to bottom.

Per optimizer step: lr from the schedule (a pure function of the step) -> torch seeded from (seed, step, rank)
-> `accum_steps` micro-batches of forward (under autocast) + backward -> losses averaged over ranks on the
device -> optional clipping -> AdamW step. The host reads the losses only on logged steps, before checkpoints
and at chunk ends (no per-step sync): a non-finite loss then stops every rank with a clear message naming the
first bad step, before any checkpoint after it is written. On CUDA, batches arrive in pinned memory and are
copied without blocking. Rank 0 logs every
`log.every` steps, saves reconstruction pictures (pre-training) and writes checkpoints. The data stream is cut
into chunks of `chunk_steps` steps, each a fresh loader seeded from (seed, chunk, rank) (see data.py), so a run
resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from multimae.losses import finetune_loss, pretraining_loss
from shards import fs, modalities

from . import checkpoints as ckpt
from . import data as mdata
from .distributed import all_reduce_mean
from .evaluate import evaluate_run
from .logger import fmt_eta, truncate_keys_after
from .state import Run, TrainingError

if TYPE_CHECKING:
    from .config import RunConfig


class NonFiniteLoss(TrainingError):
    """The loss became NaN or inf: the run stops on every rank, its last checkpoint stays."""


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, warmup_lr: float, min_lr: float) -> float:
    """Linear warmup from warmup_lr to base_lr over warmup_steps, then cosine to min_lr at total_steps."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimizer step on one rank (masking, drop-path)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def forward_loss(run: Run, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """One micro-batch: per-task losses (+ "total") and the model output ((preds, masks) or the head's output)."""
    cfg = run.cfg
    inputs = {d: batch[d] for d in cfg.data.inputs}
    if cfg.pretraining:
        m = cfg.model
        preds, masks = model(
            inputs,
            num_encoded_tokens=m.num_encoded_tokens,
            alphas=m.alphas,
            sample_tasks_uniformly=m.sample_tasks_uniformly,
            fp32_output_adapters=tuple(m.fp32_output_adapters),
        )
        # every input is a target (norm_rgb is scored against rgb)
        return pretraining_loss(preds, inputs, masks, patch_size=m.patch_size), (preds, masks)
    output = model(inputs)
    o = cfg.optim
    loss = finetune_loss(
        cfg.objective,
        output,
        batch["target"],
        label_smoothing=o.label_smoothing,
        ignore_index=cfg.data.ignore_index,
        depth_loss=o.depth_loss,
        **dense_loss_args(cfg),
    )
    return {cfg.objective: loss, "total": loss}, output


def dense_loss_args(cfg: RunConfig) -> dict[str, Any]:
    """The `dense` objective's loss options from its target's kind: the loss (optim.dense_loss or the kind's
    default) and whether the values are unit vectors."""
    if cfg.objective != "dense":
        return {}
    entry = modalities.of(cfg.data.target)
    return {"dense_loss": cfg.optim.dense_loss or entry.losses[0], "unit_vectors": entry.unit_vectors}


def make_mixup(run: Run) -> Any:
    """timm's Mixup / CutMix with label smoothing for classification (None when both alphas are 0)."""
    d = run.cfg.data
    if run.cfg.objective != "cls" or not (d.mixup or d.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=d.mixup,
        cutmix_alpha=d.cutmix,
        label_smoothing=run.cfg.optim.label_smoothing,
        num_classes=len(run.labels["cls"]),
    )


def mix(run: Run, mixup: Any, batch: dict[str, Any], seed: int) -> None:
    """Mix the batch's (single) input and its labels in place; timm draws from numpy's global generator, which
    is seeded here from the step so that a resumed run mixes the same way."""
    domain = next(iter(run.cfg.data.inputs))
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        batch[domain], batch["target"] = mixup(batch[domain], batch["target"])
    finally:
        np.random.set_state(state)


def save(run: Run, step: int) -> None:
    """Rank 0 writes OUT/checkpoint.pt (and checkpoint-<step>.pt with train.keep_checkpoints).

    First every rank uploads its staged run files (object storage, run_folder.py), so the uploaded logs always
    reach at least the checkpoint's step: a resume drops the surplus, and no step is logged twice or lost.
    """
    if run.logger is not None:
        run.logger.flush()
    run.folder.upload()
    if not run.dist.main:
        return
    urls = [run.ckpt_url]
    if run.cfg.train.keep_checkpoints:
        urls.append(fs.join(run.out_dir, f"checkpoint-{step:08d}.pt"))
    for url in urls:
        ckpt.save_checkpoint(
            url,
            model=run.model,
            optimizer=run.optimizer,
            step=step,
            config=run.cfg.to_dict(),
            model_spec=run.spec,
            labels=run.labels,
            scheduler=run.schedule,
            run=run.identity,
            data=dict(seed=run.cfg.train.seed, chunk_steps=run.plan.chunk_steps, world_size=run.dist.world),
        )


class LossWatch:
    """Stops a run at its first non-finite loss without a host sync per step: each step's (rank-averaged)
    losses stay on the device, the first bad step is kept there, and `check` (on logged steps, before every
    checkpoint and at the end of a chunk) raises NonFiniteLoss naming that step and its losses."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.bad_step: torch.Tensor | None = None  # -1 while every loss was finite
        self.bad_values: torch.Tensor | None = None

    def add(self, step: int, names: list[str], values: torch.Tensor) -> None:
        """The losses `names` of `step`, averaged over ranks (a tensor on the device)."""
        self.names = names
        if self.bad_step is None:
            self.bad_step = torch.full((), -1, dtype=torch.long, device=values.device)
            self.bad_values = torch.zeros_like(values)
        first = (self.bad_step < 0) & ~torch.isfinite(values).all()
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_values = torch.where(first, values, self.bad_values)

    def check(self, last_good: str) -> None:
        if self.bad_step is None or int(self.bad_step) < 0:
            return
        bad = {k: float(v) for k, v in zip(self.names, self.bad_values.cpu())}
        raise NonFiniteLoss(
            f"non-finite loss at step {int(self.bad_step)}: {bad}; lower optim.blr, set optim.clip_grad, "
            f"or use train.dtype=float32 (last good checkpoint: {last_good})"
        )


def train_steps(run: Run, end: int) -> dict[str, float]:
    """Train from run.step up to step `end`; returns the last logged losses."""
    cfg, d, plan = run.cfg, run.dist, run.plan
    accum = cfg.train.accum_steps
    keys_file = None
    if cfg.log.sample_keys:
        path = run.folder.path(f"keys-rank{d.rank}.txt", fetch=True)
        truncate_keys_after(path, run.step)  # a resumed run retakes the steps after its checkpoint
        keys_file = open(path, "a")
    mixup = make_mixup(run)
    t0 = last_t = time.time()
    start = last_step = run.step
    last: dict[str, float] = {}
    watch = LossWatch()
    run.module.train()
    while run.step < end:
        chunk = run.step // plan.chunk_steps
        loader = mdata.train_loader(
            run.shards_root,
            run.rank_shards,
            run.transform_args,
            micro_batch=plan.micro_batch,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            readahead=cfg.data.readahead,
            seed=cfg.train.seed,
            chunk=chunk,
            rank=d.rank,
            pin_memory=d.device.type == "cuda",
            defer_rgb=run.decode_device != "cpu",
        )
        batches = iter(loader)
        for _ in range((run.step - chunk * plan.chunk_steps) * accum):
            next(batches)  # resume inside a chunk: replay the consumed batches
        chunk_end = min(end, (chunk + 1) * plan.chunk_steps)
        while run.step < chunk_end:
            step = run.step
            lr = lr_at(step, **run.schedule)
            for g in run.optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            torch.manual_seed(step_seed(cfg.train.seed, step, d.rank))
            sums: dict[str, torch.Tensor] = {}
            for micro in range(accum):
                batch = run.prepare_batch(next(batches))
                if mixup is not None:
                    mix(run, mixup, batch, step_seed(cfg.train.seed, step, d.rank) + micro)
                if keys_file is not None:
                    keys_file.write("".join(f"{step}\t{k}\n" for k in batch["__key__"]))
                sync = micro == accum - 1 or not d.enabled
                with contextlib.nullcontext() if sync else run.module.no_sync(), run.autocast():
                    losses, _ = forward_loss(run, run.module, batch)
                (losses["total"] / accum).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
            names = sorted(sums)
            values = all_reduce_mean(torch.stack([sums[k] for k in names]), d)  # on the device: no host sync
            watch.add(step, names, values)
            grad_norm = None
            if cfg.optim.clip_grad is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.clip_grad)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step = step = step + 1
            logged = step % cfg.log.every == 0 or step == plan.total_steps
            saves = step % cfg.train.checkpoint_every == 0 and step != plan.total_steps
            if logged or saves or step == chunk_end:  # the host reads the losses only here
                watch.check(run.ckpt_url)
                last = {f"loss/{k}": float(v) for k, v in zip(names, values.cpu())}

            if logged:
                now = time.time()
                rate = (step - last_step) * cfg.train.batch_size / max(now - last_t, 1e-9)
                eta = (plan.total_steps - step) * (now - t0) / max(step - start, 1)
                scalars = {**last, "lr": lr, "samples_per_s": rate}
                if grad_norm is not None:
                    scalars["grad_norm"] = float(grad_norm)
                parts = " ".join(f"{k[5:]} {v:.4f}" for k, v in last.items() if k != "loss/total")
                run.logger.log(
                    step,
                    scalars,
                    f"step {step}/{plan.total_steps} loss {last['loss/total']:.4f} "
                    f"({parts}) lr {lr:.3g} {rate:.1f} samples/s ETA {fmt_eta(eta)}",
                )
                last_t, last_step = now, step
            if cfg.pretraining and cfg.log.image_every and step % cfg.log.image_every == 0 and d.main:
                save_reconstructions(run, step)
            if saves:
                if keys_file is not None:
                    keys_file.flush()
                save(run, step)
            if (
                not cfg.pretraining
                and cfg.train.eval_every
                and step % cfg.train.eval_every == 0
                and step != plan.total_steps
                and plan.eval_shards
            ):
                results = evaluate_run(run)
                run.logger.log(
                    step,
                    {f"eval/{k}": float(v) for k, v in results.items()},
                    "eval " + " ".join(f"{k} {v:.4f}" for k, v in results.items()),
                )
                run.module.train()
        del batches, loader  # stops this chunk's workers
    if keys_file is not None:
        keys_file.close()
    return last


def save_reconstructions(run: Run, step: int) -> str:
    """OUT/reconstructions/step-<step>.png (its URL): fixed samples, masked inputs, predictions and targets."""
    from .visualize import save_reconstruction_png

    cfg, plan = run.cfg, run.plan
    shards = plan.eval_shards or plan.train_shards[:1]
    root, args = (run.eval_root, run.eval_transform_args) if plan.eval_shards else (run.shards_root, run.transform_args)
    samples = mdata.eval_samples(root, shards, args)
    batch = run.prepare_batch(next(mdata.batched(samples, cfg.log.num_images)))
    model = run.model
    was_training = model.training
    model.eval()
    device = run.dist.device
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)  # the same masks at every step: pictures are comparable
        with run.autocast():
            _, (preds, masks) = forward_loss(run, model, batch)
    model.train(was_training)
    name = f"reconstructions/step-{step:08d}.png"
    save_reconstruction_png(run.folder.path(name), batch, preds, masks, cfg.data.inputs, cfg.model.patch_size)
    return run.folder.url_of(name)
