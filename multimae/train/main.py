"""Setting up and running one training job: `run()` = `setup()` -> `engine.train_steps()` -> `finish()`.

`setup` turns a config, a shard set and a run folder into one `Run` object, in the order a reader expects:
distributed environment -> manifest and plan (steps, lr, shard split) -> model (from --init) -> precision ->
optimizer -> resume from OUT/checkpoint.pt when it belongs to the same run -> DDP / compile -> logging.
`finish` writes the last checkpoint, the reconstruction picture (pre-training) or the evaluation
(fine-tuning) and OUT/summary.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import multimae
from multimae.model import OBJECTIVE_DEFAULTS
from multimae.precision import autocast_dtype, dtype_name
from shards import format as fmt
from shards import fs, modalities

from . import checkpoints as ckpt
from . import data as mdata
from . import evaluate as mevaluate
from .config import ConfigError, RunConfig
from .distributed import Dist, all_gather, all_reduce_sum, barrier, setup_distributed, shutdown
from .engine import TrainingError, prepare_batch, save, save_reconstructions, train_steps
from .logger import Logger
from .run_folder import RunFolder

__all__ = ["Run", "TrainingError", "run", "setup"]


# ---------------------------------------------------------------- plan


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


def make_plan(
    cfg: RunConfig, manifest: dict, world: int, eval_only: bool = False, eval_manifest: dict | None = None
) -> Plan:
    t = cfg.train
    per_step = t.batch_size // (world * t.accum_steps)
    if per_step * world * t.accum_steps != t.batch_size:
        raise ConfigError(
            f"train.batch_size {t.batch_size} is not divisible by world size {world} x "
            f"train.accum_steps {t.accum_steps}"
        )
    train_shards, eval_shards = mdata.split_shards(
        manifest,
        cfg.data.train_shards,
        cfg.data.eval_shards,
        cfg.data.eval_num_shards,
        need_train=not eval_only,
        eval_manifest=eval_manifest,
    )
    counts = {s["name"]: s["count"] for s in manifest["shards"]}
    n_train = sum(counts[n] for n in train_shards)
    steps_per_epoch = max(1, n_train // t.batch_size)
    total = t.steps if t.steps is not None else int(round(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_epochs * steps_per_epoch))
    base_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * t.batch_size / 256
    chunk = cfg.data.chunk_steps or t.checkpoint_every
    return Plan(total, min(warmup, total), base_lr, per_step, max(1, chunk), train_shards, eval_shards, n_train)


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


def uses_depth_input(config: dict) -> bool:
    return any(m.split("_", 1)[0] == "depth" for m in config["data"]["inputs"].values())


def check_depth_space(state: dict[str, Any], cfg: RunConfig, init: str) -> None:
    """A depth input adapter trained on one depth space must not be fed the other."""
    saved = state["config"]
    space = saved["data"].get("depth_space", "depth")
    if uses_depth_input(saved) and uses_depth_input(cfg.to_dict()) and space != cfg.data.depth_space:
        raise TrainingError(
            f"--init {init} was trained with depth inputs in space {space!r}, this run feeds "
            f"{cfg.data.depth_space!r}: set data.depth_space={space} (the data is converted)"
        )


def load_init(model: torch.nn.Module, init: str, cfg: RunConfig, main: bool) -> int:
    """Initialise from a multimae-train checkpoint or an official / timm / Hub checkpoint.

    A checkpoint of the same objective (e.g. a fine-tuned run) loads whole; otherwise, for fine-tuning, only
    the encoder (global tokens, input adapters, blocks) is taken and the head starts fresh; input adapters the
    checkpoint has but this model lacks (e.g. depth/semseg when fine-tuning on rgb) are reported, not loaded.
    Returns the checkpoint's step (0 when it does not record one).
    """
    if os.path.isdir(init) or init.endswith(".safetensors"):  # Hugging Face Hub folder / safetensors file
        state = multimae.read_state_dict(init)
    else:
        state = ckpt.load_checkpoint_file(init)
    ours = ckpt.is_training_checkpoint(state)
    if ours:
        check_depth_space(state, cfg, init)
    sd = multimae.read_state_dict(state["model"] if ours else state)
    same = ours and state["config"].get("objective", state["config"].get("task")) == cfg.objective
    try:
        if same or cfg.pretraining:
            result = multimae.load_checkpoint(model, sd, strict=same)
        else:
            result = multimae.load_checkpoint(model, sd, encoder_only=True)
    except (RuntimeError, ValueError) as e:
        detail = " ".join(str(e).split())[:300]
        raise TrainingError(
            f"--init {init} does not fit this model (check model.name and the model size "
            f"fields against the checkpoint's): {detail}"
        ) from None
    if main:
        print(
            f"initialised from {init}: {len(result.missing_keys)} missing keys {result.missing_keys[:4]}, "
            f"{len(result.unexpected_keys)} unexpected",
            flush=True,
        )
    return int(state.get("step", 0)) if ours else 0


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


# ---------------------------------------------------------------- the run object


@dataclass
class Run:
    """Everything a training job holds, built by `setup`."""

    cfg: RunConfig
    dist: Dist
    shards_root: str
    out_dir: str
    manifest: dict
    plan: Plan
    eval_manifest: dict  # the manifest of the evaluation shard set (the same as `manifest` without data.eval_root)
    model: torch.nn.Module  # the plain module (saved, evaluated)
    spec: dict[str, Any]
    labels: dict[str, list[str]]
    dtype: torch.dtype
    identity: dict[str, Any]
    module: torch.nn.Module | None = None  # what forward/backward run through (DDP / compiled wrapper)
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    init_step: int = 0  # the step of the --init checkpoint (what --eval-only reports without a run of its own)
    schedule: dict[str, Any] = field(default_factory=dict)
    logger: Logger | None = None
    folder: RunFolder = field(init=False)  # local paths of the run's growing files (staged on object storage)

    def __post_init__(self) -> None:
        self.folder = RunFolder(self.out_dir)

    @property
    def ckpt_url(self) -> str:
        return fs.join(self.out_dir, ckpt.CHECKPOINT)

    @property
    def eval_root(self) -> str:
        return self.cfg.data.eval_root or self.shards_root

    @property
    def rank_shards(self) -> list[str]:
        return mdata.rank_shards(self.plan.train_shards, self.dist.rank, self.dist.world)

    @property
    def transform_args(self) -> dict[str, Any]:
        """SampleTransform arguments for the training shards."""
        return mdata.transform_args(self.cfg, self.manifest)

    @property
    def eval_transform_args(self) -> dict[str, Any]:
        """SampleTransform arguments for the evaluation shards (their manifest's depth meanings)."""
        return mdata.transform_args(self.cfg, self.eval_manifest)

    def autocast(self) -> contextlib.AbstractContextManager:
        device = self.dist.device.type
        return torch.autocast(device, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def save_checkpoint(self, url: str, step: int) -> None:
        ckpt.save_checkpoint(
            url,
            model=self.model,
            optimizer=self.optimizer,
            step=step,
            config=self.cfg.to_dict(),
            model_spec=self.spec,
            labels=self.labels,
            scheduler=self.schedule,
            run=self.identity,
            data=dict(seed=self.cfg.train.seed, chunk_steps=self.plan.chunk_steps, world_size=self.dist.world),
        )


def _identity(cfg: RunConfig, shards_root: str, init: str | None) -> dict[str, Any]:
    """What makes two invocations the same run: the config, the shard set and the initial weights."""
    where = lambda p: os.path.abspath(p) if p and fs.is_local(p) else p  # noqa: E731
    return {"config": cfg.to_dict(), "shards": where(shards_root), "init": where(init)}


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    diffs = [f"--{k} {saved.get(k)} (now {now[k]})" for k in ("shards", "init") if saved.get(k) != now[k]]

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif a != b:
            diffs.append(f"{key}={a!r} (now {b!r})")

    walk(saved.get("config", {}), now["config"], "")
    return diffs


def _check_resume(state: dict[str, Any], run: Run, url: str, explicit: bool) -> None:
    """A checkpoint in OUT resumes only the same run (or any run with --resume, where exactness allows)."""
    diffs = _differences(state.get("run", {}), run.identity)
    if diffs and not explicit:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise TrainingError(
            f"{run.out_dir} holds another run (step {state['step']}) made with {shown}: use "
            "another --out, --resume to continue it with these settings, or --no-resume to "
            "start over"
        )
    saved = state["config"]
    for section, key in (("train", "batch_size"), ("train", "seed"), ("data", "inputs"), (None, "objective")):
        a = (saved if section is None else saved[section]).get(key)
        b = getattr(run.cfg if section is None else getattr(run.cfg, section), key)
        if a != b:
            name = key if section is None else f"{section}.{key}"
            raise TrainingError(
                f"{url} was written with {name}={a!r}, this run has {b!r}: use another --out "
                "or the same config to resume"
            )
    if state["data"]["world_size"] != run.dist.world:
        raise TrainingError(
            f"{url} was written by {state['data']['world_size']} ranks, this run has "
            f"{run.dist.world}: exact resume needs the same world size (the data split depends on it)"
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
    init_step = load_init(model, init, cfg, d.main) if init else 0
    freeze_encoder(model, cfg.model.trainable_blocks)
    model.to(d.device)
    try:
        dtype, why = autocast_dtype(d.device, cfg.train.dtype)
    except ValueError as e:
        raise ConfigError(f"train.dtype: {e}") from None
    run = Run(
        cfg,
        d,
        shards_root,
        out_dir,
        manifest,
        plan,
        eval_manifest,
        model,
        spec,
        labels_of(cfg, manifest),
        dtype,
        _identity(cfg, shards_root, init),
        init_step=init_step,
    )
    if d.main:
        hint = "; train.dtype=float32 forces float32" if dtype != torch.float32 else ""
        print(f"precision: {dtype_name(dtype)} ({why}){hint}", flush=True)

    url = resume if isinstance(resume, str) else run.ckpt_url
    state = None
    if isinstance(resume, str) or (resume is not False and fs.exists(url)):
        state = ckpt.load_checkpoint_file(url)
        if not ckpt.is_training_checkpoint(state):
            raise TrainingError(f"{url} is not a multimae-train checkpoint; give it as --init instead")
    if eval_only:
        return run, state

    if d.main:
        ckpt.remove_stale_temporaries(out_dir)
    groups = multimae.param_groups(
        model, cfg.optim.weight_decay, layer_decay=cfg.optim.layer_decay, decay_everything=cfg.optim.decay_everything
    )
    fused = d.device.type in ("cpu", "cuda")  # one fused kernel instead of a loop over parameters
    run.optimizer = torch.optim.AdamW(
        groups, lr=plan.base_lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=fused
    )
    for g in run.optimizer.param_groups:
        g.setdefault("lr_scale", 1.0)
    if state is not None:
        _check_resume(state, run, url, explicit=resume is True or isinstance(resume, str))
        model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.step = int(state["step"])
        if d.main:
            print(f"resuming {url} at step {run.step}", flush=True)

    run.module = torch.compile(model) if cfg.model.compile else model
    if d.enabled:
        run.module = torch.nn.parallel.DistributedDataParallel(
            run.module,
            device_ids=[d.local_rank] if d.device.type == "cuda" else None,
            # pre-training: a modality can get 0 visible tokens; DPT: refinenet4 has an unused unit (as official)
            find_unused_parameters=cfg.pretraining or run.spec["kwargs"].get("head") == "dpt",
        )
    run.schedule = dict(
        base_lr=plan.base_lr,
        warmup_steps=plan.warmup_steps,
        total_steps=plan.total_steps,
        warmup_lr=cfg.optim.warmup_lr,
        min_lr=cfg.optim.min_lr,
    )
    run.logger = Logger(run.folder, d.main, cfg.log.tensorboard, start_step=run.step)
    if d.main:
        fs.makedirs(out_dir)
        fs.write_json_atomic(fs.join(out_dir, "config.json"), cfg.to_dict())
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"objective {cfg.objective} | model {cfg.model.name} ({n_params / 1e6:.2f} M params) | world {d.world} | "
            f"device {d.device} {dtype_name(dtype)} | global batch {cfg.train.batch_size} = {d.world} x "
            f"{cfg.train.accum_steps} x {plan.micro_batch} | lr {plan.base_lr:.3g} | steps {plan.total_steps} "
            f"(warmup {plan.warmup_steps}) | train shards {len(plan.train_shards)} ({plan.num_train_samples} "
            f"samples), eval shards {len(plan.eval_shards)}",
            flush=True,
        )
    return run, state


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


def evaluate_only(run: Run, state: dict[str, Any] | None, init: str | None, save_predictions: bool) -> dict:
    """--eval-only: evaluate OUT/checkpoint.pt (or the --init weights when OUT has none); says which and the step."""
    if state is not None:
        try:
            run.model.load_state_dict(state["model"])
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise TrainingError(f"{run.ckpt_url} does not fit the model of this config: {detail}") from None
        run.step, source = int(state["step"]), run.ckpt_url
    elif init:
        run.step, source = run.init_step, init
    else:
        raise ConfigError(f"--eval-only needs a checkpoint: none in {run.out_dir}, and no --init given")
    if run.dist.main:
        print(f"evaluating {source} (step {run.step})", flush=True)
    return final_eval(run, save_predictions, source)


def predict_fn(run: Run):
    def predict(batch: dict[str, Any]) -> torch.Tensor:
        batch = prepare_batch(run, batch)
        with run.autocast():
            out = run.model({dom: batch[dom] for dom in run.cfg.data.inputs})
        return out.float()

    return predict


def evaluate_run(run: Run, store: mevaluate.PredictionStore | None = None) -> dict[str, float]:
    """Metrics over the eval shards; ranks split the shards and add their sums (all on rank 0 with a store)."""
    run.model.eval()
    d = run.dist
    shards = run.plan.eval_shards if store is not None else run.plan.eval_shards[d.rank :: d.world]
    samples = mdata.eval_samples(run.eval_root, shards, run.eval_transform_args)
    batches = mdata.batched(samples, max(1, run.plan.micro_batch))
    num_classes = len(run.labels[run.cfg.objective]) if run.cfg.objective in run.labels else None
    scores = mevaluate.evaluate(
        predict_fn(run),
        batches,
        metric_family(run.cfg),
        num_classes,
        ignore_index=run.cfg.data.ignore_index,
        store=store,
        reduce=(lambda x: all_reduce_sum(x, d)) if store is None else None,
    )
    return metric_names(run.cfg, scores)


def metric_family(cfg: RunConfig) -> str:
    """The metrics a fine-tuning run is scored with: its objective's, or for `dense` its target kind's
    (normals: angular errors; depth: delta1, AbsRel, RMSE; other dense kinds: L1, RMSE)."""
    return modalities.of(cfg.data.target).metrics if cfg.objective == "dense" else cfg.objective


def metric_names(cfg: RunConfig, results: dict[str, Any]) -> dict[str, Any]:
    """eval.json's metric names: `dense` runs name them after the target kind (normals/mean_angle_deg, ...)."""
    if cfg.objective != "dense":
        return results
    return {f"{modalities.of(cfg.data.target).kind}/{k}": v for k, v in results.items()}


def final_eval(run: Run, save_predictions: bool, source: str) -> dict[str, Any]:
    """Evaluate on the eval shards, print the table, write OUT/eval.json (and predictions.zarr)."""
    if not run.plan.eval_shards:
        raise ConfigError("no eval shards: set data.eval_shards or data.eval_num_shards")
    d = run.dist
    results: dict[str, Any] = {}
    if save_predictions:
        if d.main:
            store = mevaluate.PredictionStore(run.folder.path("predictions.zarr"), run.cfg.objective)
            results = evaluate_run(run, store)
            run.folder.upload()
        barrier(d)
    else:
        results = evaluate_run(run)
    if d.main:
        record = {
            "objective": run.cfg.objective,
            "target": run.cfg.data.target,
            "inputs": run.cfg.data.inputs,
            "checkpoint": source,
            "step": run.step,
            "eval_shards": run.plan.eval_shards,
            "metrics": results,
        }
        mevaluate.write_eval(fs.join(run.out_dir, "eval.json"), record)
        print(mevaluate.format_table(results), flush=True)
    return results
