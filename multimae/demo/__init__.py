"""The interactive cross-modal page (`multimae-demo RUN`) and the functions under it.

`predict` and its helpers (predict.py) and the loaders (loading.py) need no gradio; the page (app.py) imports
gradio when it is built, so `pip install -e '.[demo]'` is only needed to serve it.
"""

from .loading import (
    DemoError,
    DemoModel,
    ModelSource,
    NoCheckpoint,
    check_teachers,
    load_demo_model,
    load_teachers,
)
from .predict import (
    Prediction,
    Sample,
    model_inputs,
    pictures,
    predict,
    pseudo_labels,
    sample_targets,
    scene_sample,
    upload_sample,
    visible_masks,
)

__all__ = [
    "DemoError",
    "DemoModel",
    "ModelSource",
    "NoCheckpoint",
    "Prediction",
    "Sample",
    "check_teachers",
    "load_demo_model",
    "load_teachers",
    "model_inputs",
    "pictures",
    "predict",
    "pseudo_labels",
    "sample_targets",
    "scene_sample",
    "upload_sample",
    "visible_masks",
]
