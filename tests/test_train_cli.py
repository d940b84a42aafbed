"""multimae-train as a user meets it: one-line errors before torch loads, no silent resume, export, leftovers."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import multimae
from multimae.interop import CheckpointError
from multimae.train.checkpoints import load_checkpoint_file, load_model
from multimae.train.cli import main as cli_main
from multimae.train.config import load_run_config
from multimae.train.export import export_run
from multimae.train.main import run
from multimae.train.state import TrainingError
from shards.build import build
from shards.sources import synthetic_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_YAML = os.path.join(ROOT, "pipelines", "pretrain-demo.yaml")
TINY = [
    "model.dim_tokens=64",
    "model.num_blocks=2",
    "model.num_heads=2",
    "model.decoder_dim=64",
    "model.decoder_blocks=1",
    "model.decoder_heads=2",
    "model.patch_size=8",
    "model.num_encoded_tokens=16",
    "data.image_size=32",
    "data.inputs={rgb: rgb, depth: depth_gt, semseg: semseg_gt}",
    "data.eval_num_shards=1",
    "data.shuffle_buffer=8",
    "data.num_workers=0",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "log.tensorboard=false",
    "log.every=1",
    "train.steps=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("shards") / "data")
    build(synthetic_source(16, size=32, seed=5), out, shard_size=8, progress=False)
    return out


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("shards") / "other")
    build(synthetic_source(16, size=32, seed=6), out, shard_size=8, progress=False)
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "multimae.train", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (
            "multimae.train.cli",
            ["--shards", "x", "--config", PRETRAIN_YAML, "model.name=multimae-huge"],
            "multimae-train: error: config: override 'model.name=multimae-huge': model.name: unknown model",
        ),
        (
            "multimae.train.cli",
            ["--shards", "x", "--config", PRETRAIN_YAML, "data.inputs.depht=depth"],
            "data.inputs.depht: unknown input domain (known: rgb, depth, semseg, normals)",
        ),
        (
            "labeling.cli",
            [os.path.join(ROOT, "pipelines", "pseudolabel.yaml"), "teachers.depth.model.x=1"],
            "multimae-label: error: config: override 'teachers.depth.model.x=1': teachers.depth.model is",
        ),
    ],
)
def test_config_errors_are_one_line_exit_2_and_come_before_torch(module, argv, message):
    code = (
        "import sys, io, contextlib\n"
        f"from {module} import main\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        "    try:\n"
        f"        code = main({argv!r})\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "print(code, 'torch' in sys.modules)\n"
        "print(err.getvalue(), end='')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    status, *err = proc.stdout.splitlines()
    assert status == "2 False", proc.stdout + proc.stderr  # exit 2, torch never imported
    assert len(err) == 1 and message in err[0], err


def test_print_config_shows_the_resolved_config(capsys):
    cli_main(["--config", PRETRAIN_YAML, "--print-config", "optim.blr=3e-4", "train.dtype=float32"])
    text = capsys.readouterr().out
    assert "objective: pretrain" in text and "blr: 0.0003" in text and "dtype: float32" in text
    assert load_run_config(PRETRAIN_YAML, ["optim.blr=3e-4"]).optim.blr == 3e-4


def test_no_silent_resume_of_another_run(data, other_data, tmp_path):
    out = str(tmp_path / "run")
    cfg = load_run_config(PRETRAIN_YAML, TINY)
    assert run(cfg, data, out)["steps"] == 2
    assert run(cfg, data, out)["resumed_from"] == 2  # the same run again: continues (here: already done)
    with pytest.raises(TrainingError, match=r"holds another run \(step 2\) made with --shards .*other"):
        run(cfg, other_data, out)
    longer = load_run_config(PRETRAIN_YAML, TINY + ["train.steps=3"])
    with pytest.raises(TrainingError, match=r"train\.steps=2 \(now 3\)"):
        run(longer, data, out)
    assert run(longer, data, out, resume=True)["resumed_from"] == 2  # --resume: continue with the new settings
    assert run(cfg, other_data, out, resume=False)["resumed_from"] == 0  # --no-resume: start over
    proc = cli("--shards", data, "--config", PRETRAIN_YAML, "--out", out, *TINY)  # CLI: one line, exit 2
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "holds another run" in proc.stderr and "--resume" in proc.stderr


def test_init_that_does_not_fit_is_one_line(data, tmp_path):
    pre = str(tmp_path / "pre")
    run(load_run_config(PRETRAIN_YAML, TINY), data, pre)
    ft = [o for o in TINY if not o.startswith(("model.decoder", "model.num_encoded", "data.inputs"))]
    ft = [o.replace("model.num_blocks=2", "model.num_blocks=3") for o in ft] + ["model.head_dim=64"]
    proc = cli(
        "--shards",
        data,
        "--config",
        os.path.join(ROOT, "pipelines", "finetune-demo-semseg.yaml"),
        "--out",
        str(tmp_path / "ft"),
        "--init",
        os.path.join(pre, "checkpoint.pt"),
        *ft,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "does not fit this model" in proc.stderr


def test_eval_only_says_which_checkpoint_and_step(data, tmp_path, capsys):
    out = str(tmp_path / "ft")
    ft = [o for o in TINY if not o.startswith(("model.decoder", "model.num_encoded", "data.inputs"))]
    cfg = load_run_config(os.path.join(ROOT, "pipelines", "finetune-demo-semseg.yaml"), ft + ["model.head_dim=64"])
    run(cfg, data, out)
    capsys.readouterr()
    results = run(cfg, data, out, eval_only=True)
    assert f"evaluating {os.path.join(out, 'checkpoint.pt')} (step 2)" in capsys.readouterr().out
    record = json.load(open(os.path.join(out, "eval.json")))
    assert record["step"] == 2 and record["checkpoint"].endswith("checkpoint.pt") and record["metrics"] == results


def test_export_writes_a_hub_folder_that_loads_back(data, tmp_path):
    out, hub = str(tmp_path / "ft"), str(tmp_path / "hub")
    ft = [o for o in TINY if not o.startswith(("model.decoder", "model.num_encoded", "data.inputs"))]
    cfg = load_run_config(os.path.join(ROOT, "pipelines", "finetune-demo-semseg.yaml"), ft + ["model.head_dim=64"])
    run(cfg, data, out)
    export_run(out, hub)
    config = json.load(open(os.path.join(hub, "config.json")))
    classes = json.load(open(os.path.join(data, "manifest.json")))["modalities"]["semseg_gt"]["classes"]
    assert config["id2label"] == {str(i): c for i, c in enumerate(classes)} and config["objective"] == "semseg"
    card = open(os.path.join(hub, "README.md")).read()
    assert "arxiv.org/abs/2204.01678" in card and data in card and "mIoU" in card
    loaded = multimae.MultiViT.from_pretrained(hub)
    trained, _ = load_model(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), trained(x))


def test_weights_only_refusal_never_suggests_unpickling(tmp_path):
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    with open(path, "wb") as f:
        torch.save({"model": {}, "args": Payload()}, f, pickle_module=pickle)
    for load in (load_checkpoint_file, multimae.read_state_dict):
        with pytest.raises(CheckpointError) as err:
            load(str(path))
        assert "not a weights-only checkpoint" in str(err.value) and "weights_only=False" not in str(err.value)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint_file(str(tmp_path / "cut.pt"))


def test_stale_temporaries_go_and_steps_are_logged_once_after_a_resume(data, tmp_path):
    out = tmp_path / "run"
    cfg = load_run_config(PRETRAIN_YAML, TINY + ["train.steps=4", "train.checkpoint_every=2"])
    run(cfg, str(data), str(out), stop_at=2)
    (out / "checkpoint.pt.tmp-deadbeef").write_bytes(b"x" * 1000)  # a killed run's half-written checkpoint
    with open(out / "metrics.jsonl", "a") as f:  # a killed run logged step 3 after its last checkpoint
        f.write(json.dumps({"step": 3, "loss/total": 9.9}) + "\n" + '{"step": 4, "loss/to')
    run(cfg, str(data), str(out))
    assert not list(out.glob("*.tmp-*"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_an_error_from_a_loader_worker_is_one_line(data, tmp_path):
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(data, bad)
    (bad / "rgb" / "shard-000000.json").write_text("{not json")
    proc = cli(
        "--shards",
        str(bad),
        "--config",
        PRETRAIN_YAML,
        "--out",
        str(tmp_path / "run"),
        *TINY,
        "data.num_workers=1",
        "data.eval_num_shards=0",
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "shard-000000.json" in proc.stderr and "Traceback" not in proc.stderr


def test_label_print_config_shows_the_resolved_settings(capsys):
    from labeling.cli import main as label_main

    assert (
        label_main(
            [
                os.path.join(ROOT, "pipelines", "pseudolabel.yaml"),
                "--print-config",
                "batch_size=8",
                "teachers.semseg=null",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "batch_size: 8" in text and "semseg:" not in text and "kind: depth" in text
