"""Fine-tuning evaluation: metric sums over the evaluation shards, the zarr prediction dump, eval.json.

`evaluate_run` / `final_eval` / `evaluate_only` score a `Run` on its evaluation shards (split across ranks).
Scores come from `multimae.metrics` (its docstring defines each one). Here they are kept as sums in one
float64 tensor per objective, so ranks add their parts with a single all_reduce:
  - cls: correct@1, correct@5 (with at least 5 classes), samples -> top1, top5 (%);
  - semseg: the confusion matrix -> mIoU, pixel_acc (%), pooled over every pixel of the set;
  - depth: per-image delta1 (%), AbsRel, RMSE summed over images -> their mean over images;
  - normals: angle sum, pixel count, counts under 11.25 / 22.5 / 30 degrees and a 0.01-degree histogram of the
    angles -> mean_angle_deg, median_angle_deg, within_* (%), pooled over every valid pixel of the set;
  - dense (any other dense target): sums of |error| and error^2 and the value count -> L1, RMSE, pooled over
    every valid pixel and channel of the set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from multimae import metrics
from shards import fs, modalities

from . import data as mdata
from .config import ConfigError, RunConfig
from .distributed import all_reduce_sum, barrier
from .state import Run, TrainingError


class MetricSums:
    """Running sums of one objective's metrics (`sums` is the tensor ranks all_reduce)."""

    def __init__(self, objective: str, num_classes: int | None = None, ignore_index: int = 255):
        if objective not in ("cls", "semseg", "depth", "normals", "dense"):
            raise ValueError(f"no metric for objective {objective!r}")
        self.objective, self.ignore_index = objective, ignore_index
        self.num_classes = num_classes or 1
        sizes = {"cls": 3, "semseg": self.num_classes**2, "depth": 4, "normals": metrics.NORMAL_SUMS_SIZE, "dense": 4}
        self.sums = torch.zeros(sizes[objective], dtype=torch.float64)

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """cls: logits (B, K), target (B,); semseg: class ids (B, H, W) x2; depth: (B, H, W) x2;
        normals: (B, 3, H, W) x2; dense: (B, C, H, W) or (B, H, W) x2 (a (B, 1, H, W) target fits (B, H, W) too).
        """
        output, target = output.detach().cpu(), target.cpu()
        if self.objective == "cls":
            k5 = metrics.topk_correct(output, target, 5) if self.num_classes >= 5 else 0
            self.sums += torch.tensor([metrics.topk_correct(output, target, 1), k5, len(target)], dtype=torch.float64)
        elif self.objective == "semseg":
            cm = metrics.confusion_matrix(output, target, self.num_classes, self.ignore_index)
            self.sums += cm.flatten().double()
        elif self.objective == "normals":
            self.sums += metrics.normal_sums(metrics.angular_errors_deg(output, target))
        elif self.objective == "dense":
            self.sums += metrics.dense_error_sums(output, target)
        else:
            for p, t in zip(output.float(), target.float()):
                errors = metrics.depth_errors(p, t)
                if errors is not None:
                    self.sums += torch.tensor([errors["delta1"], errors["AbsRel"], errors["RMSE"], 1.0])

    def compute(self) -> dict[str, float]:
        s = self.sums
        if self.objective == "cls":
            n = max(s[2].item(), 1.0)
            out = {"top1": 100.0 * s[0].item() / n}
            if self.num_classes >= 5:
                out["top5"] = 100.0 * s[1].item() / n
            return {**out, "count": int(s[2].item())}
        if self.objective == "semseg":
            cm = s.view(self.num_classes, self.num_classes)
            scores = metrics.segmentation_scores(cm)
            return {"mIoU": 100.0 * scores["mIoU"], "pixel_acc": 100.0 * scores["pixel_acc"], "pixels": int(cm.sum())}
        if self.objective == "normals":
            scores = {k: 100.0 * v if k.startswith("within_") else v for k, v in metrics.normal_scores(s).items()}
            return {**scores, "pixels": int(s[1].item())}
        if self.objective == "dense":
            return {**metrics.dense_scores(s), "pixels": int(s[3].item())}
        n = max(s[3].item(), 1.0)
        return {
            "delta1": 100.0 * s[0].item() / n,
            "AbsRel": s[1].item() / n,
            "RMSE": s[2].item() / n,
            "images": int(s[3].item()),
        }


def to_prediction(objective: str, output: torch.Tensor) -> torch.Tensor:
    """Model output -> stored prediction: class ids (cls: (B,), semseg: (B, H, W)), depth (B, H, W), or the
    dense output as is (normals (B, 3, H, W); one channel (B, 1, H, W) -> (B, H, W))."""
    if objective in ("cls", "semseg"):
        return output.argmax(1)
    if objective == "depth":
        return output[:, 0] if output.dim() == 4 else output
    return output[:, 0] if output.dim() == 4 and output.shape[1] == 1 else output


class PredictionStore:
    """predictions.zarr: arrays `pred` and `target` (one sample per chunk) and `keys`, appended batch by batch."""

    def __init__(self, url: str, objective: str, attrs: dict[str, Any] | None = None):
        import zarr

        self.group = zarr.open_group(url, mode="w")
        self.group.attrs.update({"objective": objective, **(attrs or {})})
        self.arrays: dict[str, Any] = {}

    def append(self, keys: list[str], pred: torch.Tensor, target: torch.Tensor) -> None:
        for name, x in (("pred", pred), ("target", target)):
            a = x.detach().cpu().numpy()
            if a.dtype == np.int64:
                a = a.astype(np.int32)
            if name not in self.arrays:
                self.arrays[name] = self.group.create_array(
                    name, shape=(0, *a.shape[1:]), chunks=(1, *a.shape[1:]), dtype=a.dtype
                )
            self.arrays[name].append(a)
        if "keys" not in self.arrays:
            self.arrays["keys"] = self.group.create_array("keys", shape=(0,), chunks=(4096,), dtype=str)
        self.arrays["keys"].append(np.asarray(keys, dtype=str))


@torch.no_grad()
def evaluate(
    predict: Callable[[dict[str, Any]], torch.Tensor],
    batches: Iterable[dict[str, Any]],
    objective: str,
    num_classes: int | None,
    *,
    ignore_index: int = 255,
    store: PredictionStore | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Run `predict` over `batches` and return the objective's metrics (summed across ranks with `reduce`)."""
    sums = MetricSums(objective, num_classes, ignore_index)
    for batch in batches:
        output = predict(batch)
        target = batch["target"]
        if objective in ("depth", "dense") and target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]  # (B, 1, H, W) -> (B, H, W), as the prediction
        pred = to_prediction(objective, output)
        sums.update(output if objective == "cls" else pred, target)
        if store is not None:
            store.append(list(batch["__key__"]), pred, target)
    if reduce is not None:
        sums.sums = reduce(sums.sums)
    return sums.compute()


def write_eval(url: str, record: dict[str, Any]) -> None:
    fs.write_json_atomic(url, record)


def format_table(results: dict[str, float]) -> str:
    """A two-column text table of the metrics, values right-aligned."""
    cells = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in results.items()]
    width = max(len("metric"), *(len(k) for k, _ in cells))
    vwidth = max(len("value"), *(len(v) for _, v in cells))
    lines = [f"{'metric':<{width}}  {'value':>{vwidth}}", f"{'-' * width}  {'-' * vwidth}"]
    return "\n".join(lines + [f"{k:<{width}}  {v:>{vwidth}}" for k, v in cells])


# ---------------------------------------------------------------- a run's evaluation


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


def predict_fn(run: Run) -> Callable[[dict[str, Any]], torch.Tensor]:
    def predict(batch: dict[str, Any]) -> torch.Tensor:
        batch = run.prepare_batch(batch)
        with run.autocast():
            out = run.model({dom: batch[dom] for dom in run.cfg.data.inputs})
        return out.float()

    return predict


def evaluate_run(run: Run, store: PredictionStore | None = None) -> dict[str, float]:
    """Metrics over the eval shards; ranks split the shards and add their sums (all on rank 0 with a store)."""
    run.model.eval()
    d = run.dist
    shards = run.plan.eval_shards if store is not None else run.plan.eval_shards[d.rank :: d.world]
    samples = mdata.eval_samples(run.eval_root, shards, run.eval_transform_args)
    batches = mdata.batched(samples, max(1, run.plan.micro_batch))
    num_classes = len(run.labels[run.cfg.objective]) if run.cfg.objective in run.labels else None
    scores = evaluate(
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
            store = PredictionStore(run.folder.path("predictions.zarr"), run.cfg.objective)
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
        write_eval(fs.join(run.out_dir, "eval.json"), record)
        print(format_table(results), flush=True)
    return results
