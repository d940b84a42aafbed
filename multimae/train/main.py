"""Setting up and running one training job: `run()` = `setup()` -> `engine.train_steps()` -> `finish()`.

`setup` turns a config, a shard set and a run folder into one `Run` object (`state.py`), in the order a reader
expects: distributed environment -> manifest and plan (steps, lr, shard split) -> model (from --init, by the
rules in `checkpoints.py`) -> precision -> optimizer -> resume from OUT/checkpoint.pt when it belongs to the
same run -> DDP / compile -> logging; the `Run` is built once, when all of it exists. The evaluation of a
fine-tuning run is `evaluate.py`'s.
`finish` writes the last checkpoint, the reconstruction picture (pre-training) or the evaluation
(fine-tuning) and OUT/summary.json.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch

import multimae
from multimae.model import OBJECTIVE_DEFAULTS
from shards import format as fmt
from shards import fs, modalities
from shards.precision import autocast_dtype, dtype_name

from . import checkpoints as ckpt
from . import data as mdata
from .config import ConfigError, RunConfig
from .distributed import Dist, all_gather, setup_distributed, shutdown
from .engine import save, save_reconstructions, train_steps
from .evaluate import evaluate_only, final_eval
from .logger import Logger
from .run_folder import RunFolder
from .state import Run, TrainingError, make_plan

__all__ = ["Run", "TrainingError", "run", "setup"]


# ---------------------------------------------------------------- model


def class_names(manifest: dict, modality: str) -> list[str]:
    entry = manifest["modalities"].get(modality)
    if entry is None:
        raise fmt.FormatError(f"modality {modality!r} is not in the manifest (has {sorted(manifest['modalities'])})")
    if "classes" not in entry:
        raise fmt.FormatError(f"manifest entry of {modality!r} has no class list")
    return list(entry["classes"])


def labels_of(cfg: RunConfig, manifest: dict) -> dict[str, list[str]]:
    """Class names the model's semseg input/outputs and head use (saved in checkpoints and exports)."""
    labels = {}
    semseg = cfg.data.inputs.get("semseg") or (cfg.data.target if cfg.objective == "semseg" else None)
    if semseg is not None:
        names = class_names(manifest, semseg)
        if cfg.objective == "semseg" and cfg.data.reduce_zero_label:
            names = names[1:]
        labels["semseg"] = names
    if cfg.objective == "cls":
        if not manifest.get("cls_classes"):
            raise fmt.FormatError("objective cls needs class labels, but the manifest has no cls_classes")
        labels["cls"] = list(manifest["cls_classes"])
    return labels


def model_spec(cfg: RunConfig, manifest: dict) -> dict[str, Any]:
    """{"name", "kwargs"} for `multimae.create_model`: everything needed to rebuild the model from a checkpoint."""
    m, d = cfg.model, cfg.data
    kwargs: dict[str, Any] = dict(
        image_size=d.image_size,
        patch_size=m.patch_size,
        in_domains=list(d.inputs),
        drop_path=m.drop_path,
        num_global_tokens=m.num_global_tokens,
    )
    for key, value in (("dim_tokens", m.dim_tokens), ("depth", m.num_blocks), ("num_heads", m.num_heads)):
        if value is not None:
            kwargs[key] = value
    labels = labels_of(cfg, manifest)
    out_domains = list(d.inputs) if m.out_domains is None else m.out_domains
    if "semseg" in d.inputs or (cfg.pretraining and "semseg" in out_domains):
        kwargs["num_semseg_classes"] = m.num_semseg_classes or len(class_names(manifest, d.inputs["semseg"]))
    if cfg.pretraining:
        out = out_domains + (["norm_rgb"] if m.extra_norm_pix_loss and "norm_rgb" not in out_domains else [])
        kwargs.update(
            out_domains=out, decoder_dim=m.decoder_dim, decoder_depth=m.decoder_blocks, decoder_heads=m.decoder_heads
        )
        return {"name": m.name, "kwargs": kwargs}
    head = m.head or OBJECTIVE_DEFAULTS[cfg.objective][0]
    num_classes = len(labels[cfg.objective]) if cfg.objective in labels else None
    if cfg.objective == "dense":
        num_classes = modalities.of(d.target).channels  # the head predicts the target kind's channels
    head_kwargs = {}
    names = {
        "dpt": {"head_dim": "feature_dim", "head_layer_dims": "layer_dims"},
        "convnext": {"head_dim": "embed_dim", "head_blocks": "depth"},
    }.get(head, {})
    for field_name, arg in names.items():
        if getattr(m, field_name) is not None:
            head_kwargs[arg] = getattr(m, field_name)
    kwargs.update(objective=cfg.objective, head=head, num_classes=num_classes, head_kwargs=head_kwargs)
    return {"name": m.name, "kwargs": kwargs}


def freeze_encoder(model: torch.nn.Module, trainable_blocks: int | None) -> None:
    """Partial fine-tuning: only the last `trainable_blocks` encoder blocks and the head keep learning."""
    if trainable_blocks is None:
        return
    blocks = len(model.encoder)
    frozen = blocks - min(trainable_blocks, blocks)
    for name, p in model.named_parameters():
        if name.startswith(("global_tokens", "input_adapters.")) or (
            name.startswith("encoder.") and int(name.split(".")[1]) < frozen
        ):
            p.requires_grad_(False)


def read_shard_set(root: str, cfg: RunConfig) -> dict:
    """The manifest of a shard set, checked to hold every modality the config reads."""
    manifest = fmt.read_manifest(root)
    for m in mdata.modalities_needed(cfg.data.inputs, None if cfg.pretraining else cfg.data.target):
        if m not in manifest["modalities"]:
            raise fmt.FormatError(
                f"{root}: modality {m!r} (from data.inputs/data.target) is not in the manifest; "
                f"it has {sorted(manifest['modalities'])}"
            )
    return manifest


def check_same_labels(cfg: RunConfig, train: dict, evaluation: dict) -> None:
    """A separate evaluation set must use the training set's class lists (same names, same order)."""
    lists = [("cls_classes", train.get("cls_classes"), evaluation.get("cls_classes"))] if cfg.objective == "cls" else []
    for m in mdata.modalities_needed(cfg.data.inputs, None if cfg.pretraining else cfg.data.target):
        if train["modalities"][m].get("kind") == "semseg":
            lists.append(
                (f"classes of {m!r}", train["modalities"][m].get("classes"), evaluation["modalities"][m].get("classes"))
            )
    for what, a, b in lists:
        if a != b:
            raise fmt.FormatError(
                f"{cfg.data.eval_root}: its {what} differ from the training set's: build it with "
                "the same class list (multimae-shard build --classes-from TRAIN_DATA)"
            )


def setup(
    cfg: RunConfig,
    shards_root: str,
    out_dir: str,
    d: Dist,
    *,
    init: str | None = None,
    resume: str | bool | None = None,
    eval_only: bool = False,
) -> tuple[Run, dict[str, Any] | None]:
    """Build the Run; also returns the checkpoint it resumes from (None for a fresh start)."""
    manifest = read_shard_set(shards_root, cfg)
    eval_manifest = manifest
    if cfg.data.eval_root is not None:
        eval_manifest = read_shard_set(cfg.data.eval_root, cfg)
        check_same_labels(cfg, manifest, eval_manifest)
    if eval_only and cfg.pretraining:
        raise ConfigError("--eval-only needs a fine-tuning config (objective cls, semseg, depth or dense)")
    plan = make_plan(cfg, manifest, d.world, eval_only, eval_manifest if cfg.data.eval_root else None)
    if (cfg.data.mixup or cfg.data.cutmix) and plan.micro_batch % 2:
        raise ConfigError(
            f"data.mixup / data.cutmix mix pairs of samples: the per-device batch {plan.micro_batch} must be even"
        )

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    spec = model_spec(cfg, manifest)
    model = multimae.create_model(spec["name"], **spec["kwargs"])
    init_step = ckpt.load_init(model, init, cfg, d.main) if init else 0
    freeze_encoder(model, cfg.model.trainable_blocks)
    model.to(d.device)
    try:
        dtype, why = autocast_dtype(d.device, cfg.train.dtype)
    except ValueError as e:
        raise ConfigError(f"train.dtype: {e}") from None
    if d.main:
        hint = "; train.dtype=float32 forces float32" if dtype != torch.float32 else ""
        print(f"precision: {dtype_name(dtype)} ({why}){hint}", flush=True)
    identity = ckpt.run_identity(cfg, shards_root, init)
    ckpt_url = fs.join(out_dir, ckpt.CHECKPOINT)
    url, state = ckpt.resume_state(resume, ckpt_url)
    folder = RunFolder(out_dir)
    parts = dict(
        cfg=cfg, dist=d, shards_root=shards_root, out_dir=out_dir, ckpt_url=ckpt_url, manifest=manifest, plan=plan,
        eval_manifest=eval_manifest, model=model, spec=spec, labels=labels_of(cfg, manifest), dtype=dtype,
        identity=identity, folder=folder, init_step=init_step,
    )  # fmt: skip
    if eval_only:
        return Run(**parts), state

    if d.main:
        ckpt.remove_stale_temporaries(out_dir)
    optimizer = make_optimizer(model, cfg, plan.base_lr, d)
    step = 0
    if state is not None:
        explicit = resume is True or isinstance(resume, str)
        ckpt.check_resume(state, cfg, identity, d.world, out_dir, url, explicit)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if d.main:
            print(f"resuming {url} at step {step}", flush=True)
    schedule = dict(
        base_lr=plan.base_lr,
        warmup_steps=plan.warmup_steps,
        total_steps=plan.total_steps,
        warmup_lr=cfg.optim.warmup_lr,
        min_lr=cfg.optim.min_lr,
    )
    transform = mdata.SampleTransform(train=True, **mdata.transform_args(cfg, parts["manifest"]))
    run = Run(
        **parts,
        module=wrap_model(model, cfg, d, spec),
        optimizer=optimizer,
        schedule=schedule,
        logger=Logger(folder, d.main, cfg.log.tensorboard, start_step=step),
        step=step,
        decode_device=mdata.rgb_decode_device(cfg.data.decode_device, d.device, transform),
    )
    if d.main:
        fs.makedirs(out_dir)
        fs.write_json_atomic(fs.join(out_dir, "config.json"), cfg.to_dict())
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"objective {cfg.objective} | model {cfg.model.name} ({n_params / 1e6:.2f} M params) | world {d.world} | "
            f"device {d.device} {dtype_name(dtype)} | global batch {cfg.train.batch_size} = {d.world} x "
            f"{cfg.train.accum_steps} x {plan.micro_batch} | lr {plan.base_lr:.3g} | steps {plan.total_steps} "
            f"(warmup {plan.warmup_steps}) | train shards {len(plan.train_shards)} ({plan.num_train_samples} "
            f"samples), eval shards {len(plan.eval_shards)} | rgb decoded on {run.decode_device}",
            flush=True,
        )
    return run, state


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, lr: float, d: Dist) -> torch.optim.Optimizer:
    """AdamW over the official parameter groups (weight decay, layer decay), each with its lr scale."""
    groups = multimae.param_groups(
        model, cfg.optim.weight_decay, layer_decay=cfg.optim.layer_decay, decay_everything=cfg.optim.decay_everything
    )
    fused = d.device.type in ("cpu", "cuda")  # one fused kernel instead of a loop over parameters
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=fused)
    for g in optimizer.param_groups:
        g.setdefault("lr_scale", 1.0)
    return optimizer


def wrap_model(model: torch.nn.Module, cfg: RunConfig, d: Dist, spec: dict[str, Any]) -> torch.nn.Module:
    """What forward and backward run through: the model, compiled (model.compile) and in DDP (several ranks)."""
    module = torch.compile(model) if cfg.model.compile else model
    if d.enabled:
        module = torch.nn.parallel.DistributedDataParallel(
            module,
            device_ids=[d.local_rank] if d.device.type == "cuda" else None,
            # pre-training: a modality can get 0 visible tokens; DPT: refinenet4 has an unused unit (as official)
            find_unused_parameters=cfg.pretraining or spec["kwargs"].get("head") == "dpt",
        )
    return module


def run(
    cfg: RunConfig,
    shards_root: str,
    out_dir: str,
    *,
    init: str | None = None,
    resume: str | bool | None = None,
    eval_only: bool = False,
    save_predictions: bool = False,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train (or, with eval_only, evaluate) according to `cfg`; returns a summary dict.

    resume: None = continue OUT/checkpoint.pt when it holds this same run (config, shards, init), and refuse
    when it holds another; True = continue it even with other settings (exactness-critical ones must match);
    False = start fresh; a path = continue from that checkpoint.
    stop_at: leave after this step with a checkpoint (a job slot ends); the schedule still spans train.steps.
    """
    fs.set_storage_options(cfg.data.storage_options)
    d = setup_distributed(cfg.train.device)
    run_ = None
    try:
        run_, state = setup(cfg, shards_root, out_dir, d, init=init, resume=resume, eval_only=eval_only)
        if eval_only:
            return evaluate_only(run_, state, init, save_predictions)
        start = run_.step
        t0 = time.time()
        end = run_.plan.total_steps if stop_at is None else min(stop_at, run_.plan.total_steps)
        last = train_steps(run_, end)
        return finish(run_, start, time.time() - t0, last, save_predictions)
    finally:
        if run_ is not None:
            run_.folder.close()  # object storage: the last logs and pictures go up, even when the run failed
        shutdown(d)


def finish(run: Run, start: int, seconds: float, last: dict[str, float], save_predictions: bool) -> dict[str, Any]:
    """Last checkpoint, then the reconstruction picture or the evaluation once the schedule is done; summary."""
    save(run, run.step)
    summary: dict[str, Any] = {
        "objective": run.cfg.objective,
        "steps": run.step,
        "resumed_from": start,
        "seconds": round(seconds, 1),
        "samples_per_s": (run.step - start) * run.cfg.train.batch_size / max(seconds, 1e-9),
        "checkpoint": run.ckpt_url,
        "dtype": dtype_name(run.dtype),
        "weights_digest": all_gather(weights_digest(run.model), run.dist),
        **last,
    }
    finished = run.step >= run.plan.total_steps  # else stopped early (stop_at); the next call resumes
    if finished and run.cfg.pretraining and run.dist.main:
        summary["reconstructions"] = save_reconstructions(run, run.step)
    elif finished and not run.cfg.pretraining:
        summary["eval"] = final_eval(run, save_predictions, run.ckpt_url)
    run.logger.close()
    if run.dist.main:
        fs.write_json_atomic(fs.join(run.out_dir, "summary.json"), summary)
    return summary


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (ranks of a healthy DDP run agree bit for bit)."""
    h = hashlib.sha256()
    for name, t in sorted(ckpt.unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- evaluation
