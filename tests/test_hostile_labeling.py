"""Hostile and broken data never hurts the labeling job (docs/trust-model.md): it reads its input through
shards.reader, so the reader's rules hold in every actor, and a shard that disagrees with its stats fails
whole (nothing committed, manifest unchanged). Also: `pipelines/pseudolabel.py` refuses split overrides.

Actors are real `ShardLabeler`s with the shipped teachers; the end-to-end case runs real Ray.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hostile_corpus as corpus
import pytest
from PIL import EpsImagePlugin

from labeling.config import ConfigError, check_inputs
from labeling.config import load_label_config as load_config
from labeling.job import ShardLabeler, format_summary, run
from shards import format as F
from shards.writer import ShardWriter, tar_path

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "pipelines" / "pseudolabel.yaml")
S0, S1 = "shard-000000", "shard-000001"


def config(data: Path, *overrides: str):
    return load_config(CONFIG, [f"input={data}", "progress=false", "actors=1", "batch_size=4", *overrides])


@pytest.fixture(scope="module")
def labeler(one_thread):
    """One actor body, outside Ray: the same object each Ray actor runs."""
    return ShardLabeler(load_config(CONFIG, ["progress=false", "threads_per_actor=1"]))


def label(labeler: ShardLabeler, data: Path, name: str = S0) -> dict:
    labeler.cfg.input = str(data)
    return labeler.label_shard(name, ["depth", "semseg"])


def test_actor_never_renders_postscript(tmp_path, monkeypatch, labeler):
    env, marker = corpus.fake_ghostscript(tmp_path / "gsbin")
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    data = tmp_path / "data"
    corpus.rgb_set(data, [3])
    with ShardWriter(str(data), S0, ["rgb"]) as w:  # consistent stats and digests; one rgb member is EPS
        for i in range(3):
            w.write(
                corpus.key_of(0, i),
                {"rgb": {"rgb.jpg": corpus.POSTSCRIPT if i == 1 else F.encode_rgb(corpus.image(i, 32, 32))}},
            )
    result = label(labeler, data)
    assert result["count"] == 2 and [s["ref"] for s in result["skipped"]] == [corpus.key_of(0, 1)]
    assert "decode rgb" in result["skipped"][0]["reason"] and "not an image" in result["skipped"][0]["reason"]
    assert not marker.exists(), marker.read_text()


def test_members_in_directories_are_refused_not_merged(tmp_path, labeler):
    """`a/k.rgb.jpg` and `b/k.rgb.jpg` were one sample 'k' to a basename split; keys hold no directory."""
    data = tmp_path / "data"
    corpus.rgb_set(data, [2])
    items = corpus.members_of(tar_path(str(data), "rgb", S0))
    jpg = next(d for i, d in items if i.name.endswith(".rgb.jpg"))
    corpus.replace_tar(str(data), 0, [corpus.member("a/k.rgb.jpg", jpg), corpus.member("b/k.rgb.jpg", jpg)])
    with pytest.raises(F.FormatError, match=r"rgb/shard-000000\.tar: member 'a/k\.rgb\.jpg': is not named <key>"):
        label(labeler, data)
    assert not [p for mod in ("depth", "semseg") for p in (data / mod).glob("*") if not p.name.startswith(".")]


def test_sparse_member_in_an_actor_is_refused_in_bounded_memory(tmp_path):
    data = tmp_path / "data"
    corpus.rgb_set(data, [3])
    name = f"{corpus.key_of(0, 1)}.rgb.jpg"
    items = [
        (i, d) if i.name != name else corpus.sparse_gnu(name, corpus.GiB)
        for i, d in corpus.members_of(tar_path(str(data), "rgb", S0))
    ]
    corpus.replace_tar(str(data), 0, items)
    script = (
        "import sys; from labeling.config import load_label_config as load_config; "
        "from labeling.job import ShardLabeler; "
        "cfg = load_config(sys.argv[1], [f'input={sys.argv[2]}', 'progress=false']); "
        "ShardLabeler(cfg).label_shard('shard-000000', ['depth', 'semseg'])"
    )
    code, _, err, rss = corpus.run_bounded([sys.executable, "-c", script, CONFIG, str(data)], timeout=300)
    assert code == 1 and f"member '{name}': is a sparse member that expands to {corpus.GiB} bytes" in err, err[-3000:]
    assert rss < 1.5 * corpus.GiB, rss


def test_manifest_naming_a_shard_outside_the_input_is_refused_before_labeling(tmp_path):
    victim = tmp_path / "victim"  # data/rgb/../../victim
    corpus.rgb_set(victim, [2])
    before = (victim / "rgb" / f"{S0}.tar").read_bytes()
    data = tmp_path / "data"
    corpus.rgb_set(data, [2])
    manifest = F.read_manifest(str(data))
    manifest["shards"][0]["name"] = "../../victim/rgb/shard-000000"
    (data / "manifest.json").write_text(__import__("json").dumps(manifest))
    with pytest.raises(ConfigError, match=r"invalid shard name '\.\./\.\./victim/rgb/shard-000000'"):
        check_inputs(config(data))  # the job's first step, before Ray
    assert (victim / "rgb" / f"{S0}.tar").read_bytes() == before


@pytest.fixture
def ray_local():
    """A local Ray instance started the way tests/test_labeling_job.py starts it (run() then reuses it)."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_input_shard_cut_at_a_member_boundary_fails_whole(tmp_path, ray_local):
    """10 of 20 samples survive a cut at a member boundary (tarfile stops quietly there): the shard fails,
    nothing is committed for it and the manifest is not updated; the intact shard is labeled."""
    data = tmp_path / "data"
    corpus.rgb_set(data, [4, 20])
    path = tar_path(str(data), "rgb", S1)
    Path(path).write_bytes(
        corpus.tar_bytes(corpus.members_of(path)[:20])[:-1024]
    )  # 10 samples of 2 members, no end blocks
    summary = run(config(data))
    assert summary["shards_labeled"] == 1 and list(summary["shards_failed"]) == [S1]
    assert f"{path}: read 10 samples but" in summary["shards_failed"][S1]
    assert not summary["manifest_updated"] and "depth" not in F.read_manifest(str(data))["modalities"]
    for mod in ("depth", "semseg"):
        assert sorted(p.name for p in (data / mod).iterdir()) == [f"{S0}.json", f"{S0}.tar"]
    assert f"FAILED   {S1}: FormatError: {path}: read 10 samples" in format_summary(summary)


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["input=/data/my", "photos"], "argument 'photos' is not a dotted key=value override"),
        (["shards=[shard-000001,", "shard-000002]"], "override 'shards=[shard-000001,': the value is not valid YAML"),
        (["input=x", "-rf"], "argument '-rf' is not a dotted key=value override"),
    ],
)
def test_pseudolabel_entry_refuses_split_overrides_before_ray_starts(argv, problem):
    res = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "pseudolabel.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"},  # were Ray reached, this address would fail differently
    )
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"pseudolabel.py: error: {problem}") and "shlex.quote" in line
