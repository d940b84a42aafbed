"""The lean trainer: MultiMAE pre-training and fine-tuning on streamed shards (DESIGN.md section 6).

One readable loop for both jobs (`run`), in the spirit of nanoGPT's train.py:
  - DDP from the `torchrun` environment (gloo on CPU, nccl on GPU); the global batch `train.batch_size` is split
    into world_size x accum_steps micro-batches, lr = blr x batch_size / 256 (unless optim.lr is given);
  - AdamW (betas 0.9/0.95 by default), lr as a pure function of the step: linear warmup, then cosine;
  - bf16 autocast on GPUs that support it (fp32 on CPU), gradient accumulation, optional clipping,
    optional torch.compile, a non-finite loss stops the run on every rank with a clear message;
  - every step seeds torch from (seed, step, rank), and the data stream is a function of (seed, step)
    (data.py), so a run resumed from a checkpoint continues exactly as an uninterrupted one;
  - rank 0 logs a line, `metrics.jsonl` and TensorBoard scalars every `log.every` steps, saves
    reconstruction PNGs (pre-training) and writes `checkpoint.pt` atomically every `train.checkpoint_every`
    steps and at the end; fine-tuning ends with an evaluation on the held-out shards (`eval.json`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import multimae
from multimae import checkpointing as ckpt
from multimae import data as mdata
from multimae import evaluate as mevaluate
from multimae.config import ConfigError, RunConfig
from shards import format as fmt
from shards import fs


class TrainingError(RuntimeError):
    """A run cannot go on (non-finite loss, incompatible checkpoint); the message says why and what to do."""


# ---------------------------------------------------------------- distributed plumbing


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    """Read the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and pick the device and backend."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, dev)


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        x = x.to(d.device)
        dist.all_reduce(x)
    return x.cpu()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimizer step on one rank (masking, drop-path)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


# ---------------------------------------------------------------- schedule


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, warmup_lr: float, min_lr: float) -> float:
    """Linear warmup from warmup_lr to base_lr over warmup_steps, then cosine to min_lr at total_steps."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Plan:
    """Numbers derived from the config, the manifest and the world size."""

    total_steps: int
    warmup_steps: int
    base_lr: float
    micro_batch: int
    chunk_steps: int
    train_shards: list[str]
    eval_shards: list[str]
    num_train_samples: int


def make_plan(cfg: RunConfig, manifest: dict, world: int, eval_only: bool = False) -> Plan:
    t = cfg.train
    per_step = t.batch_size // (world * t.accum_steps)
    if per_step * world * t.accum_steps != t.batch_size:
        raise ConfigError(
            f"train.batch_size {t.batch_size} is not divisible by world size {world} x "
            f"train.accum_steps {t.accum_steps}"
        )
    train_shards, eval_shards = mdata.split_shards(
        manifest, cfg.data.train_shards, cfg.data.eval_shards, cfg.data.eval_num_shards, need_train=not eval_only
    )
    counts = {s["name"]: s["count"] for s in manifest["shards"]}
    n_train = sum(counts[n] for n in train_shards)
    steps_per_epoch = max(1, n_train // t.batch_size)
    total = t.steps if t.steps is not None else int(round(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_epochs * steps_per_epoch))
    base_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * t.batch_size / 256
    chunk = cfg.data.chunk_steps or t.checkpoint_every
    return Plan(total, min(warmup, total), base_lr, per_step, max(1, chunk), train_shards, eval_shards, n_train)


# ---------------------------------------------------------------- model and losses


def semseg_classes(manifest: dict, modality: str, reduce_zero_label: bool = False) -> int:
    entry = manifest["modalities"].get(modality)
    if entry is None:
        raise fmt.FormatError(f"modality {modality!r} is not in the manifest (has {sorted(manifest['modalities'])})")
    if "classes" not in entry:
        raise fmt.FormatError(f"manifest entry of {modality!r} has no class list")
    return len(entry["classes"]) - (1 if reduce_zero_label else 0)


def num_outputs(cfg: RunConfig, manifest: dict) -> int | None:
    """Classes of the fine-tuning head (None for depth)."""
    if cfg.task == "cls":
        classes = manifest.get("cls_classes")
        if not classes:
            raise fmt.FormatError("task cls needs class labels, but the manifest has no cls_classes")
        return len(classes)
    if cfg.task == "semseg":
        return semseg_classes(manifest, cfg.data.target, cfg.data.reduce_zero_label)
    return None


def build_model(cfg: RunConfig, manifest: dict) -> torch.nn.Module:
    m = cfg.model
    in_domains = tuple(cfg.data.inputs)
    kwargs: dict[str, Any] = dict(
        image_size=cfg.data.image_size, patch_size=m.patch_size, in_domains=in_domains, drop_path=m.drop_path
    )
    if "semseg" in in_domains or (cfg.task == "pretrain" and "semseg" in m.out_domains):
        kwargs["num_semseg_classes"] = m.num_semseg_classes or semseg_classes(manifest, cfg.data.inputs["semseg"])
    if cfg.task == "pretrain":
        missing = [d for d in m.out_domains if ("rgb" if d == "norm_rgb" else d) not in cfg.data.inputs]
        if missing:
            raise ConfigError(f"model.out_domains {missing} need a shard modality in data.inputs")
        out = list(m.out_domains)
        if m.extra_norm_pix_loss and "norm_rgb" not in out:
            out.append("norm_rgb")
        kwargs["out_domains"] = tuple(out)
    else:
        kwargs.update(head=m.head, task=cfg.task, num_classes=num_outputs(cfg, manifest))
    kwargs.update(m.kwargs)
    return multimae.create_model(m.name, **kwargs)


def standardize_depth_inputs(batch: dict[str, Any], cfg: RunConfig) -> None:
    """Robust (trimmed) per-sample standardization of depth inputs, as the official trainer does on device."""
    if cfg.data.standardize_depth:
        for domain, modality in cfg.data.inputs.items():
            if fmt.modality_kind(modality) == "depth":
                batch[domain] = multimae.robust_standardize_depth(batch[domain])


def berhu_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Reverse Huber on valid pixels; threshold c = 0.2 x max |error| of the batch (official depth fine-tuning)."""
    err = (pred - target).abs()[valid]
    c = (0.2 * err.max()).clamp_min(1e-6).detach()
    return torch.where(err <= c, err, (err**2 + c**2) / (2 * c)).mean()


def finetune_loss(cfg: RunConfig, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    if cfg.task == "cls":
        loss = F.cross_entropy(output.float(), target, label_smoothing=cfg.optim.label_smoothing)
    elif cfg.task == "semseg":
        loss = F.cross_entropy(output.float(), target, ignore_index=cfg.data.ignore_index)
    else:
        pred = output.float()[:, 0] if output.dim() == 4 else output.float()  # (B, H, W)
        tgt = target[:, 0] if target.dim() == 4 else target
        valid = torch.isfinite(tgt) & (tgt > 0)
        if not valid.any():
            return {cfg.task: pred.sum() * 0.0, "total": pred.sum() * 0.0}
        loss = berhu_loss(pred, tgt, valid) if cfg.optim.depth_loss == "berhu" else (pred - tgt).abs()[valid].mean()
    return {cfg.task: loss, "total": loss}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_loss(model: torch.nn.Module, batch: dict[str, Any], cfg: RunConfig) -> tuple[dict[str, torch.Tensor], Any]:
    """One micro-batch: per-task losses (+ "total") and the model output (preds, masks) or head output."""
    inputs = {d: batch[d] for d in cfg.data.inputs}
    if cfg.task == "pretrain":
        m = cfg.model
        preds, masks = model(
            inputs,
            num_encoded_tokens=m.num_encoded_tokens,
            alphas=m.alphas,
            sample_tasks_uniformly=m.sample_tasks_uniformly,
            fp32_output_adapters=tuple(m.fp32_output_adapters),
        )
        targets = {d: inputs[d] for d in preds if d in inputs}
        if "norm_rgb" in preds:
            targets["norm_rgb"] = inputs["rgb"]
        losses = multimae.pretraining_loss(preds, targets, masks, patch_size=m.patch_size)
        return losses, (preds, masks)
    output = model(inputs)
    return finetune_loss(cfg, output, batch["target"]), output


# ---------------------------------------------------------------- logging


class Logger:
    """Rank-0 logging: one line per `every` steps, metrics.jsonl and TensorBoard scalars."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def log(self, step: int, scalars: dict[str, float], line: str | None = None) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if line:
            print(line, flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------- the run


def _autocast(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 autocast only on GPUs that support it; CPU autocast is slow on most CPUs and changes numerics
    if cfg.train.dtype == "bfloat16" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _transform_args(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.data
    return dict(
        inputs=dict(d.inputs),
        target=d.target if cfg.task != "pretrain" else None,
        image_size=d.image_size,
        crop_scale=tuple(d.crop_scale),
        crop_ratio=tuple(d.crop_ratio),
        hflip=d.hflip,
        reduce_zero_label=d.reduce_zero_label,
        ignore_index=d.ignore_index,
    )


def _load_init(model: torch.nn.Module, init: str, cfg: RunConfig, main: bool) -> None:
    """Initialise from a trainer checkpoint or an official/timm checkpoint (via multimae.load_checkpoint).

    A checkpoint of the same task (e.g. a fine-tuned run) loads whole; otherwise, for fine-tuning, only the
    encoder (global tokens, input adapters, blocks) is taken and the head starts fresh; input adapters the
    checkpoint has but this model lacks (e.g. depth/semseg when fine-tuning on rgb) are reported, not loaded.
    """
    if os.path.isdir(init) or init.endswith(".safetensors"):  # Hugging Face Hub folder / safetensors file
        state = multimae.read_state_dict(init)
    else:
        state = ckpt.load_checkpoint_file(init)
    ours = ckpt.is_training_checkpoint(state)
    sd = multimae.read_state_dict(state["model"] if ours else state)
    same_task = ours and state["config"]["task"] == cfg.task
    if same_task or cfg.task == "pretrain":
        result = multimae.load_checkpoint(model, sd, strict=same_task)
    else:
        result = multimae.load_checkpoint(model, sd, encoder_only=True)
    if main:
        print(
            f"initialised from {init}: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:4]}, {len(result.unexpected_keys)} unexpected",
            flush=True,
        )


def _check_resume(state: dict[str, Any], cfg: RunConfig, world: int, url: str) -> None:
    saved = state["config"]
    for section, key in (("train", "batch_size"), ("train", "seed"), ("data", "inputs"), ("task", None)):
        a = saved[section] if key is None else saved[section][key]
        b = getattr(cfg, section) if key is None else getattr(getattr(cfg, section), key)
        if a != b:
            name = section if key is None else f"{section}.{key}"
            raise TrainingError(
                f"{url} was written with {name}={a!r}, this run has {b!r}: use another --out "
                f"or the same config to resume"
            )
    if state["data"]["world_size"] != world:
        raise TrainingError(
            f"{url} was written by {state['data']['world_size']} ranks, this run has {world}: "
            "exact resume needs the same world size (the data split depends on it)"
        )


def run(
    cfg: RunConfig,
    shards_root: str,
    out_dir: str,
    *,
    init: str | None = None,
    resume: str | bool = True,
    eval_only: bool = False,
    save_predictions: bool = False,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train (or, with eval_only, evaluate) according to `cfg`; returns a summary dict.

    resume: True = continue from OUT_DIR/checkpoint.pt when it exists, False = start fresh, or a path.
    stop_at: leave after this step with a checkpoint (a job slot ends); the schedule still spans train.steps.
    """
    d = setup_distributed(cfg.train.device)
    try:
        return _run(
            cfg,
            shards_root,
            out_dir,
            d,
            init=init,
            resume=resume,
            eval_only=eval_only,
            save_predictions=save_predictions,
            stop_at=stop_at,
        )
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _run(
    cfg: RunConfig,
    shards_root: str,
    out_dir: str,
    d: Dist,
    *,
    init: str | None,
    resume: str | bool,
    eval_only: bool,
    save_predictions: bool,
    stop_at: int | None,
) -> dict[str, Any]:
    manifest = fmt.read_manifest(shards_root)
    for m in mdata.modalities_needed(cfg.data.inputs, cfg.data.target if cfg.task != "pretrain" else None):
        if m not in manifest["modalities"]:
            raise fmt.FormatError(
                f"{shards_root}: modality {m!r} (from data.inputs/data.target) is not in the "
                f"manifest; it has {sorted(manifest['modalities'])}"
            )
    plan = make_plan(cfg, manifest, d.world, eval_only)
    if eval_only and cfg.task == "pretrain":
        raise ConfigError("--eval-only needs a fine-tuning config (task cls, semseg or depth)")

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg, manifest)
    if init:
        _load_init(model, init, cfg, d.main)
    model.to(d.device)
    raw_model = model

    ckpt_url = fs.join(out_dir, ckpt.CHECKPOINT)
    resume_url = resume if isinstance(resume, str) else (ckpt_url if resume and fs.exists(ckpt_url) else None)
    state = ckpt.load_checkpoint_file(resume_url) if resume_url else None

    if eval_only:
        if state is not None:
            raw_model.load_state_dict(state["model"])
        elif not init:
            raise ConfigError(f"--eval-only needs a checkpoint: none in {out_dir}, and no --init given")
        return _final_eval(
            cfg,
            raw_model,
            manifest,
            plan,
            shards_root,
            out_dir,
            d,
            save_predictions,
            step=state["step"] if state else 0,
        )

    groups = multimae.param_groups(
        raw_model,
        cfg.optim.weight_decay,
        layer_decay=cfg.optim.layer_decay,
        decay_everything=cfg.optim.decay_everything,
    )
    optimizer = torch.optim.AdamW(groups, lr=plan.base_lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    for g in optimizer.param_groups:
        g.setdefault("lr_scale", 1.0)
    start = 0
    if state is not None:
        _check_resume(state, cfg, d.world, resume_url)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if d.main:
            print(f"resumed from {resume_url} at step {start}", flush=True)

    if cfg.model.compile:
        model = torch.compile(model)
    if d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[d.local_rank] if d.device.type == "cuda" else None,
            # pre-training: a modality can get 0 visible tokens; DPT: refinenet4 has an unused unit (as official)
            find_unused_parameters=cfg.task == "pretrain" or (cfg.task != "cls" and cfg.model.head == "dpt"),
        )

    logger = Logger(out_dir, d.main, cfg.log.tensorboard)
    if d.main:
        os.makedirs(out_dir, exist_ok=True)
        fs.write_json_atomic(fs.join(out_dir, "config.json"), cfg.to_dict())
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(
            f"task {cfg.task} | model {cfg.model.name} ({n_params / 1e6:.2f} M params) | world {d.world} | "
            f"device {d.device} | global batch {cfg.train.batch_size} = {d.world} x {cfg.train.accum_steps} x "
            f"{plan.micro_batch} | lr {plan.base_lr:.3g} | steps {plan.total_steps} (warmup {plan.warmup_steps})"
            f" | train shards {len(plan.train_shards)} ({plan.num_train_samples} samples), eval shards "
            f"{len(plan.eval_shards)}",
            flush=True,
        )
    schedule = dict(
        base_lr=plan.base_lr,
        warmup_steps=plan.warmup_steps,
        total_steps=plan.total_steps,
        warmup_lr=cfg.optim.warmup_lr,
        min_lr=cfg.optim.min_lr,
    )
    data_state = dict(seed=cfg.train.seed, chunk_steps=plan.chunk_steps, world_size=d.world)
    my_shards = mdata.rank_shards(plan.train_shards, d.rank, d.world)
    keys_file = None
    if cfg.log.sample_keys:
        os.makedirs(out_dir, exist_ok=True)
        keys_file = open(os.path.join(out_dir, f"keys-rank{d.rank}.txt"), "a")

    def save(step: int) -> None:
        if not d.main:
            return
        urls = [ckpt_url] + ([fs.join(out_dir, f"checkpoint-{step:08d}.pt")] if cfg.train.keep_checkpoints else [])
        for url in urls:
            ckpt.save_checkpoint(
                url,
                model=raw_model,
                optimizer=optimizer,
                step=step,
                config=cfg.to_dict(),
                scheduler=schedule,
                data=data_state,
            )

    end = plan.total_steps if stop_at is None else min(stop_at, plan.total_steps)
    step = start
    t0, last_t, last_step = time.time(), time.time(), start
    last: dict[str, float] = {}
    model.train()
    while step < end:
        chunk = step // plan.chunk_steps
        loader = mdata.train_loader(
            shards_root,
            my_shards,
            _transform_args(cfg),
            micro_batch=plan.micro_batch,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.train.seed,
            chunk=chunk,
            rank=d.rank,
        )
        batches = iter(loader)
        for _ in range((step - chunk * plan.chunk_steps) * cfg.train.accum_steps):
            next(batches)  # resume inside a chunk: replay the consumed batches
        chunk_end = min(end, (chunk + 1) * plan.chunk_steps)
        while step < chunk_end:
            lr = lr_at(step, **schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            torch.manual_seed(step_seed(cfg.train.seed, step, d.rank))
            sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.train.accum_steps):
                batch = to_device(next(batches), d.device)
                if keys_file is not None:
                    keys_file.write("".join(f"{step}\t{k}\n" for k in batch["__key__"]))
                standardize_depth_inputs(batch, cfg)
                sync = micro == cfg.train.accum_steps - 1 or not d.enabled
                with contextlib.nullcontext() if sync else model.no_sync(), _autocast(cfg, d.device):
                    losses, _ = forward_loss(model, batch, cfg)
                (losses["total"] / cfg.train.accum_steps).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.train.accum_steps
            names = sorted(sums)
            values = all_reduce_sum(torch.stack([sums[k] for k in names]).cpu(), d) / d.world
            if not torch.isfinite(values).all():
                bad = {k: float(v) for k, v in zip(names, values)}
                raise TrainingError(
                    f"non-finite loss at step {step}: {bad}; lower optim.blr, set optim.clip_grad, "
                    f"or use train.dtype=float32 (last good checkpoint: {ckpt_url})"
                )
            if cfg.optim.clip_grad is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.clip_grad))
            else:
                grad_norm = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last = {f"loss/{k}": float(v) for k, v in zip(names, values)}

            if step % cfg.log.every == 0 or step == plan.total_steps:
                now = time.time()
                rate = (step - last_step) * cfg.train.batch_size / max(now - last_t, 1e-9)
                eta = (plan.total_steps - step) * (now - t0) / max(step - start, 1)
                scalars = {**last, "lr": lr, "samples_per_s": rate}
                if grad_norm is not None:
                    scalars["grad_norm"] = grad_norm
                parts = " ".join(f"{k[5:]} {v:.4f}" for k, v in last.items() if k != "loss/total")
                logger.log(
                    step,
                    scalars,
                    f"step {step}/{plan.total_steps} loss {last['loss/total']:.4f} "
                    f"({parts}) lr {lr:.3g} {rate:.1f} samples/s ETA {fmt_eta(eta)}",
                )
                last_t, last_step = now, step
            if cfg.task == "pretrain" and cfg.log.image_every and step % cfg.log.image_every == 0 and d.main:
                _save_reconstructions(cfg, raw_model, manifest, plan, shards_root, out_dir, step, d.device)
            if step % cfg.train.checkpoint_every == 0 and step != plan.total_steps:
                save(step)
            if (
                cfg.task != "pretrain"
                and cfg.train.eval_every
                and step % cfg.train.eval_every == 0
                and step != plan.total_steps
                and plan.eval_shards
            ):
                results = _evaluate(cfg, raw_model, manifest, plan, shards_root, d, None)
                logger.log(
                    step,
                    {f"eval/{k}": float(v) for k, v in results.items()},
                    "eval " + " ".join(f"{k} {v:.4f}" for k, v in results.items()),
                )
                model.train()
        del batches, loader  # stops this chunk's workers
    if keys_file is not None:
        keys_file.close()
    save(step)
    elapsed = time.time() - t0
    summary: dict[str, Any] = {
        "task": cfg.task,
        "steps": step,
        "resumed_from": start,
        "seconds": round(elapsed, 1),
        "samples_per_s": (step - start) * cfg.train.batch_size / max(elapsed, 1e-9),
        "checkpoint": ckpt_url,
        "weights_digest": _gather_digests(raw_model, d),
        **last,
    }
    finished = step >= plan.total_steps  # else stopped early (stop_at); the next call resumes
    if finished and cfg.task == "pretrain" and d.main:
        summary["reconstructions"] = _save_reconstructions(
            cfg, raw_model, manifest, plan, shards_root, out_dir, step, d.device
        )
    elif finished and cfg.task != "pretrain":
        summary["eval"] = _final_eval(
            cfg, raw_model, manifest, plan, shards_root, out_dir, d, save_predictions, step=step
        )
    logger.close()
    if d.main:
        fs.write_json_atomic(fs.join(out_dir, "summary.json"), summary)
    return summary


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (ranks of a healthy DDP run agree bit for bit)."""
    h = hashlib.sha256()
    for name, t in sorted(ckpt.unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gather_digests(model: torch.nn.Module, d: Dist) -> list[str]:
    digest = weights_digest(model)
    if not d.enabled:
        return [digest]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, digest)
    return out


# ---------------------------------------------------------------- evaluation and pictures


def _predict_fn(cfg: RunConfig, model: torch.nn.Module, device: torch.device):
    def predict(batch: dict[str, Any]) -> torch.Tensor:
        batch = to_device(batch, device)
        standardize_depth_inputs(batch, cfg)
        with _autocast(cfg, device):
            out = model({dom: batch[dom] for dom in cfg.data.inputs})
        return out.float()

    return predict


def _evaluate(
    cfg: RunConfig,
    model: torch.nn.Module,
    manifest: dict,
    plan: Plan,
    root: str,
    d: Dist,
    store: mevaluate.PredictionStore | None,
) -> dict[str, float]:
    """Metrics over the eval shards; ranks split the shards and add their sums (all on rank 0 with a store)."""
    model.eval()
    shards = plan.eval_shards if store is not None else plan.eval_shards[d.rank :: d.world]
    samples = mdata.eval_samples(root, shards, _transform_args(cfg))
    batches = mdata.batched(samples, max(1, plan.micro_batch))
    results = mevaluate.evaluate(
        _predict_fn(cfg, model, d.device),
        batches,
        cfg.task,
        num_outputs(cfg, manifest),
        ignore_index=cfg.data.ignore_index,
        store=store,
        reduce=(lambda x: all_reduce_sum(x, d)) if store is None else None,
    )
    return results


def _final_eval(
    cfg: RunConfig,
    model: torch.nn.Module,
    manifest: dict,
    plan: Plan,
    root: str,
    out_dir: str,
    d: Dist,
    save_predictions: bool,
    step: int,
) -> dict[str, Any]:
    if not plan.eval_shards:
        raise ConfigError("no eval shards: set data.eval_shards or data.eval_num_shards")
    results: dict[str, Any] = {}
    if save_predictions:
        if d.main:
            store = mevaluate.PredictionStore(os.path.join(out_dir, "predictions.zarr"), cfg.task)
            results = _evaluate(cfg, model, manifest, plan, root, d, store)
        if d.enabled:
            dist.barrier()
    else:
        results = _evaluate(cfg, model, manifest, plan, root, d, None)
    if d.main:
        record = {
            "task": cfg.task,
            "target": cfg.data.target,
            "inputs": cfg.data.inputs,
            "step": step,
            "eval_shards": plan.eval_shards,
            "metrics": results,
        }
        os.makedirs(out_dir, exist_ok=True)
        mevaluate.write_eval(fs.join(out_dir, "eval.json"), record)
        print(mevaluate.format_table(results), flush=True)
    return results


def _save_reconstructions(
    cfg: RunConfig,
    model: torch.nn.Module,
    manifest: dict,
    plan: Plan,
    root: str,
    out_dir: str,
    step: int,
    device: torch.device,
) -> str:
    from multimae.visualize import save_reconstruction_png

    shards = plan.eval_shards or plan.train_shards[:1]
    batch = next(mdata.batched(mdata.eval_samples(root, shards, _transform_args(cfg)), cfg.log.num_images))
    batch = to_device(batch, device)
    standardize_depth_inputs(batch, cfg)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.train.seed)  # the same masks at every step: pictures are comparable
            _, (preds, masks) = forward_loss(model, batch, cfg)
    model.train(was_training)
    path = os.path.join(out_dir, "reconstructions", f"step-{step:08d}.png")
    save_reconstruction_png(path, batch, preds, masks, cfg.data.inputs, cfg.model.patch_size)
    return path
