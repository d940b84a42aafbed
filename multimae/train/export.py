"""`multimae-train export RUN DIR`: a trained run as a Hugging Face Hub folder.

DIR gets `model.safetensors`, `config.json` (the constructor arguments `from_pretrained` reads, plus
`id2label` / `semseg_id2label` with the class names, the objective and the training data) and a `README.md`
model card naming the paper, the data and the evaluation. `MultiMAE.from_pretrained(DIR)` (pre-training runs)
or `MultiViT.from_pretrained(DIR)` (fine-tuned runs) loads it back.
"""

from __future__ import annotations

import json
import os
from typing import Any

from shards import fs

from .checkpoints import checkpoint_url, load_model

PAPER = "MultiMAE: Multi-modal Multi-task Masked Autoencoders (Bachmann, Mizrahi, Atanov, Zamir, ECCV 2022)"
PAPER_URL = "https://arxiv.org/abs/2204.01678"


def export_run(run: str, out: str) -> str:
    """Write the Hub folder of `run` (a run folder or checkpoint file) to `out`; returns `out`."""
    model, state = load_model(run)
    cfg, labels = state["config"], state.get("labels", {})
    config: dict[str, Any] = dict(model._hub_mixin_config or {})
    config.update(state["model_spec"]["kwargs"])
    config["model_name"] = state["model_spec"]["name"]
    config["objective"] = cfg["objective"]
    head_labels = labels.get(cfg["objective"])
    if head_labels:
        config["id2label"] = {str(i): name for i, name in enumerate(head_labels)}
    if "semseg" in labels and cfg["objective"] != "semseg":
        config["semseg_id2label"] = {str(i): name for i, name in enumerate(labels["semseg"])}
    config["training"] = {
        "shards": state.get("run", {}).get("shards"),
        "init": state.get("run", {}).get("init"),
        "steps": state["step"],
        "inputs": cfg["data"]["inputs"],
        "target": cfg["data"]["target"],
        "depth_space": cfg["data"].get("depth_space", "depth"),
    }
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, config=config)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(config, _eval_of(run)))
    return out


def _eval_of(run: str) -> dict | None:
    folder = os.path.dirname(checkpoint_url(run))
    path = fs.join(folder, "eval.json")
    return fs.read_json(path) if fs.exists(path) else None


def model_card(config: dict[str, Any], evaluation: dict | None) -> str:
    """A short Hub model card: what the model is, how it was trained, how to load it, how it scored."""
    cls = "MultiMAE" if config["objective"] == "pretrain" else "MultiViT"
    t = config["training"]
    lines = [
        "---",
        "library_name: multimae-toolkit",
        "license: apache-2.0",
        "tags: [multimae, vision]",
        "---",
        "",
        f"# {config['model_name']} ({config['objective']})",
        "",
        f"A {cls} from the MultiMAE toolkit, the model of *{PAPER}* ({PAPER_URL}).",
        "",
        f"- objective: {config['objective']}; inputs {json.dumps(t['inputs'])}"
        + (f"; target {t['target']}" if t["target"] else ""),
        f"- trained for {t['steps']} steps on the shard set `{t['shards']}`"
        + (f", initialised from `{t['init']}`" if t["init"] else ""),
        f"- image size {config.get('image_size')}, patch size {config.get('patch_size')}",
        "",
        "```python",
        f"from multimae import {cls}",
        f'model = {cls}.from_pretrained("path/to/this/folder")',
        "```",
    ]
    if evaluation:
        lines += [
            "",
            "## Evaluation",
            "",
            f"On the held-out shards {', '.join(evaluation.get('eval_shards', []))}:",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evaluation["metrics"].items()
        ]
    return "\n".join(lines) + "\n"
