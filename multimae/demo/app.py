"""The demo page: a Gradio front end over `predict.py` (gradio is imported when the page is built).

Left column: the image (a bundled synthetic scene or an uploaded file), where the other inputs come from
(the teachers, or a scene's exact ground truth), "RGB only", one visible-token slider per input modality and the
seed that orders the patches. Right: three rows of pictures, masked inputs, predictions and targets, one column
per modality the model has (rgb, depth, semseg, normals). Every control re-runs the prediction; the endpoint
`/predict` serves `gradio_client` the same way.

A problem the user can fix (an image that cannot be decoded or is too large, a run folder with no checkpoint
yet, teachers that do not fit the model) shows one error box on the page and writes one line to the log; the
server keeps serving.
"""

from __future__ import annotations

import functools
import html
import logging
import os
import time
from typing import Any

import numpy as np

from labeling.teachers import Teacher
from shards.show import palette

from .loading import KINDS, DemoError, DemoModel, ModelSource, check_teachers
from .predict import (
    NUM_SCENES,
    SCENE_SEED,
    model_inputs,
    pictures,
    predict,
    sample_targets,
    scene_sample,
    upload_sample,
)

log = logging.getLogger("multimae.demo")

TITLE = "MultiMAE cross-modal demo"
SCENE, UPLOAD = "synthetic scene", "uploaded image"
TEACHERS, TRUTH = "teachers", "scene ground truth"
ROWS = ("input", "prediction", "target")
PICTURES = [f"{d} {what}" for what in ROWS for d in KINDS]  # the order of the image outputs
MAX_UPLOAD = "64mb"

INTRO = f"""# {TITLE}
Give a pre-trained MultiMAE a few visible patches of RGB, depth and semantic segmentation (and surface normals,
when the model has them), and see what it predicts for every modality. The inputs besides RGB come from the
teachers (pseudo labels) or, for the synthetic scenes, from the exact ground truth; targets are the ground truth
where the scene has it, else the teachers' labels. Depth is shown standardized (10-90 % trimmed mean and std),
coloured over the target's range; normals as normal-map colours (x, y, z as red, green, blue).
"""


class Page:
    """The page's state: the model source, the teachers (loaded once) and a small cache of labelled images."""

    def __init__(self, source: ModelSource, teachers: dict[str, Teacher], teachers_from: str) -> None:
        self.source = source
        self.teachers = teachers
        self.teachers_from = teachers_from

    def model(self) -> DemoModel:
        model = self.source.get()
        check_teachers(model, self.teachers, self.teachers_from)
        return model

    @functools.lru_cache(maxsize=16)  # noqa: B019 (one Page per server, kept for its lifetime)
    def labelled(
        self, scene: int | None, upload: str | None, from_truth: bool, depth_space: str = "depth"
    ) -> tuple[Any, dict, tuple]:
        """(sample, model inputs, (targets, target classes)) of a scene or an uploaded file (gradio's copy of it,
        under a name derived from its content, so the cache key changes with the file)."""
        if scene is not None:
            sample = scene_sample(scene)
        elif upload is None:
            raise DemoError(f"choose '{SCENE}' or upload an image file first")
        else:
            with open(upload, "rb") as f:
                sample = upload_sample(f.read(), os.path.basename(upload))
            from_truth = False  # an upload has no ground truth
        labels = model_inputs(sample, self.teachers, depth_space=depth_space)
        inputs = model_inputs(sample, self.teachers, from_truth=True, depth_space=depth_space) if from_truth else labels
        return sample, inputs, sample_targets(sample, labels)

    def run(
        self,
        choice: str,
        scene: float,
        upload: str | None,
        inputs_from: str,
        rgb_only: bool,
        seed: float,
        *visible: float,
    ) -> list[Any]:
        """The page's one action: pictures for PICTURES, the status line and the class legend."""
        import gradio as gr

        t0 = time.time()
        try:
            model = self.model()
            use_scene = choice == SCENE
            sample, images, (targets, classes) = self.labelled(
                int(scene) if use_scene else None,
                None if use_scene else upload,
                inputs_from == TRUTH,
                model.depth_space,
            )
            counts = {d: int(v) for d, v in zip(KINDS, visible) if d in model.tokens}
            if rgb_only:
                counts = {d: (n if d == "rgb" else 0) for d, n in counts.items()}
            pred = predict(model, images, counts, int(seed or 0), targets=targets, target_classes=classes)
        except DemoError as e:
            log.warning("%s", e)
            raise gr.Error(str(e), print_exception=False) from None
        pics = pictures(model, pred)
        source = TRUTH if inputs_from == TRUTH and sample.truth else f"teachers ({self.teachers_from})"
        shown = ", ".join(f"{d} {pred.visible[d]}/{model.tokens[d]}" for d in model.tokens)
        status = (
            f"**{sample.name}**, visible tokens: {shown}, seed {int(seed or 0)}; other inputs from {source}; "
            f"targets: {'ground truth' if sample.truth else 'teacher labels'} ({time.time() - t0:.2f} s)  \n"
            f"model: {model.describe()}"
        )
        log.info("%s: visible %s, seed %d, %.2f s", sample.name, shown, int(seed or 0), time.time() - t0)
        return [pics.get(k) for k in PICTURES] + [status, legend(model, pred)]

    def refresh(self) -> list[Any]:
        """On page load: one slider per input modality of the current model (which may be newer than the page)."""
        import gradio as gr

        try:
            model = self.model()
        except DemoError as e:
            log.warning("%s", e)
            raise gr.Error(str(e), print_exception=False) from None
        sliders = [gr.Slider(**slider_settings(model, d)) for d in KINDS]
        shown = [gr.Image(visible=picture_shown(model, k)) for k in PICTURES]
        return sliders + shown + [f"model: {model.describe()}"]

    def first_view(self) -> tuple[DemoModel | None, list[Any] | None]:
        """The model and the outputs of the default controls, to show before any request (None, None without one)."""
        try:
            model = self.model()
        except DemoError:
            return None, None
        visible = [slider_settings(model, d)["value"] for d in KINDS]
        return model, self.run(SCENE, 0, None, TEACHERS, False, 0, *visible)


def slider_settings(model: DemoModel | None, domain: str) -> dict[str, Any]:
    """A visible-token slider: 0..tokens, the paper's budget by default (1/6 of all tokens: 98 of 588)."""
    if model is None:  # no checkpoint yet: the page load sets the sliders once there is one
        return {"maximum": 1, "value": 0, "visible": True, "label": f"visible {domain} tokens"}
    n = model.tokens.get(domain, 0)
    return {
        "maximum": max(n, 1),
        "value": max(n // 6, 1) if n else 0,
        "visible": n > 0,
        "label": f"visible {domain} tokens (of {n})",
    }


def picture_shown(model: DemoModel | None, key: str) -> bool:
    """Whether the model has the picture's modality (as an input for the input row, else as an output)."""
    domain, what = key.split()
    return model is None or domain in (model.tokens if what == "input" else model.out_domains)


def legend(model: DemoModel, pred: Any) -> str:
    """HTML chips (colour, name) for the semseg classes in the pictures."""
    arrays = [a for k, a in (*pred.inputs.items(), *pred.predictions.items(), *pred.targets.items()) if k == "semseg"]
    if not arrays:
        return ""
    ids = sorted({int(i) for a in arrays for i in np.unique(a) if i >= 0})
    names = model.semseg_classes or []
    colours = palette(max(len(names), max(ids, default=0) + 1))
    chips = [
        f'<span style="display:inline-block;margin:2px 6px"><span style="display:inline-block;width:12px;height:12px;'
        f'background:rgb{tuple(int(c * 255) for c in colours[i])};vertical-align:middle"></span> '
        f"{html.escape(names[i] if i < len(names) else f'id {i}')}</span>"
        for i in ids
    ]
    return "<div>" + "".join(chips) + "</div>"


def build_page(source: ModelSource, teachers: dict[str, Teacher], teachers_from: str = "the shipped teachers") -> Any:
    """The page as a `gradio.Blocks` (not yet launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    page = Page(source, teachers, teachers_from)
    model, first = page.first_view()
    first = first or [None] * (len(PICTURES) + 2)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        gr.Markdown(INTRO)
        status = gr.Markdown(first[-2])
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                choice = gr.Radio([SCENE, UPLOAD], value=SCENE, label="image")
                scene = gr.Slider(
                    0, NUM_SCENES - 1, step=1, value=0, label=f"scene (synthetic world, seed {SCENE_SEED})"
                )
                upload = gr.File(label="image file (JPEG, PNG, ...)", type="filepath")
                inputs_from = gr.Radio([TEACHERS, TRUTH], value=TEACHERS, label="inputs besides RGB from")
                rgb_only = gr.Checkbox(label="RGB only (the other modalities fully masked)")
                sliders = [gr.Slider(minimum=0, step=1, **slider_settings(model, d)) for d in KINDS]
                seed = gr.Number(value=0, precision=0, minimum=0, label="seed (which patches are visible)")
                button = gr.Button("Predict", variant="primary")
            with gr.Column(scale=3):
                images = {}
                for what in ROWS:
                    with gr.Row():
                        for d in KINDS:
                            key = f"{d} {what}"
                            images[key] = gr.Image(
                                first[PICTURES.index(key)],
                                label=f"{d} {'input (masked)' if what == 'input' else what}",
                                format="png",
                                interactive=False,
                                height=256,
                                visible=picture_shown(model, key),
                            )
                classes = gr.HTML(first[-1])
        controls = [choice, scene, upload, inputs_from, rgb_only, seed, *sliders]
        outputs = [*images.values(), status, classes]
        upload.upload(lambda: UPLOAD, None, choice, queue=False)
        # a page (re)load shows the current checkpoint, quietly: the first view is already there
        loaded = blocks.load(page.refresh, None, [*sliders, *images.values(), status], show_progress="hidden")
        loaded.success(page.run, controls, outputs, api_name=False, show_progress="hidden")
        gr.on(
            [button.click, scene.release, choice.change, inputs_from.change, rgb_only.change, seed.submit]
            + [s.release for s in sliders],
            page.run,
            controls,
            outputs,
            api_name="predict",
        )
    blocks.queue(default_concurrency_limit=1)
    return blocks


def serve(blocks: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Start the server (blocking unless `block=False`); returns its local URL."""
    _, url, _ = blocks.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        prevent_thread_lock=not block,
        max_file_size=MAX_UPLOAD,
        quiet=not block,
    )
    return url
