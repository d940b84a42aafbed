"""The labeling job on a multi-node Ray cluster with its input and output on S3 (moto's server on 127.0.0.1).

`ray.cluster_utils.Cluster` runs two nodes (two raylets) on this machine, one CPU each; the job's two teacher
actors are spread one per node, and every shard is read from and written to S3 by the actors themselves. The
module's clean run is the reference: a worker node killed mid-job and a driver killed with SIGKILL (then run
again) must both end with output objects byte-identical to it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import s3_environment
from test_labeling_job import FrozenActor, make_rgb_set

from labeling.config import load_label_config
from labeling.job import run
from shards import fs
from shards.format import read_manifest
from shards.lock import lock_url
from shards.reader import iter_shard
from shards.verify import verify
from shards.writer import committed_shards, read_stats

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARDS, PER_SHARD = 4, 8
OUT_MODS = ("depth", "semseg")
pytestmark = pytest.mark.slow


def output_objects(root: str) -> dict[str, bytes]:
    """Every output tar and stats json (without its duration), by path below `root`."""
    files = {}
    for mod in OUT_MODS:
        for url in fs.find(fs.join(root, mod)):
            data = fs.read_bytes(url)
            if url.endswith(".json"):
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "duration_s"}).encode()
            files[url[len(root) + 1 :]] = data
    return files


def config(data: str, out: str, *overrides: str):
    settings = [f"input={data}", f"output={out}", "progress=false", "actors=2", "batch_size=4", *overrides]
    return load_label_config(str(REPO / "pipelines" / "pseudolabel.yaml"), settings)


@pytest.fixture(scope="module")
def cluster(moto_endpoint):
    """A two-node Ray cluster (1 CPU each) whose nodes have the S3 environment, and a bucket with an rgb set."""
    pytest.importorskip("s3fs")
    import boto3
    import ray
    from ray.cluster_utils import Cluster

    tmp = f"/tmp/mmn-{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    os.makedirs(f"{tmp}/ray", exist_ok=True)
    env = {**s3_environment(moto_endpoint), "RAY_TMPDIR": tmp}  # conftest.py keeps Ray on 127.0.0.1
    # the cluster runs in this process's auth mode (token once an earlier local ray.init enabled it); say it
    # explicitly, or a driver started below would switch to token auth just because ~/.ray/auth_token exists
    env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "disabled")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # raylets and their workers inherit it, as nodes of a real cluster have theirs
    bucket = f"label-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    data = f"s3://{bucket}/in"
    keys = make_rgb_set(data, shards=SHARDS, per_shard=PER_SHARD)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": tmp, "include_dashboard": False})
    worker = c.add_node(num_cpus=1, temp_dir=tmp)
    try:
        ray.init(address=c.address, log_to_driver=False)
        yield {"cluster": c, "worker": worker, "bucket": f"s3://{bucket}", "data": data, "keys": keys}
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def reference(cluster) -> dict:
    """The clean run: both nodes, nothing killed."""
    out = f"{cluster['bucket']}/clean"
    events: list[dict] = []
    summary = run(config(cluster["data"], out), on_event=events.append)
    return {"out": out, "summary": summary, "events": events, "files": output_objects(out)}


def test_actors_spread_over_both_nodes_and_label_from_s3_to_s3(cluster, reference):
    s = reference["summary"]
    assert (s["shards_labeled"], s["samples_labeled"], s["shards_failed"]) == (SHARDS, SHARDS * PER_SHARD, {})
    (ready,) = [e for e in reference["events"] if e["event"] == "actors_ready"]
    assert len({a["node"] for a in ready["actors"]}) == 2  # one teacher actor on each node
    out = reference["out"]
    assert set(read_manifest(out)["modalities"]) == {"depth", "semseg"}
    assert read_manifest(out)["total"] == SHARDS * PER_SHARD
    for i, keys in enumerate(cluster["keys"]):
        got = list(iter_shard(out, f"shard-{i:06d}", list(OUT_MODS)))
        assert [x["__key__"] for x in got] == keys
        assert all(x["depth"].shape == x["semseg"].shape for x in got)
    assert not fs.exists(lock_url(out))


def test_a_worker_node_killed_mid_job_the_job_finishes_on_the_other(cluster, reference):
    """The worker node's actor is frozen (SIGSTOP) before any shard is handed out, so the shard it is given can
    never finish: the node dies with that shard provably in flight, whatever the machine's load."""
    import ray

    out = f"{cluster['bucket']}/node-killed"
    head = ray.get_runtime_context().get_node_id()  # the driver's node
    frozen = FrozenActor(lambda actors: next(a for a in actors if a["node"] != head))
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run(config(cluster["data"], out), on_event=frozen)))
    job.start()
    try:
        assert frozen.given.wait(timeout=400), "no shard was handed to the worker node's actor"
        started = frozen.started()
        cluster["cluster"].remove_node(cluster["worker"], allow_graceful=False)
    finally:
        frozen.kill()  # the node's death takes all its processes, the frozen one included
    job.join(timeout=400)
    assert not job.is_alive()
    assert result["shards_failed"] == {} and result["retries"] >= 1 and result["manifest_updated"]
    events = frozen.events
    retried = [e for e in events if e["event"] == "shard_retry"]
    assert started["shard"] in {e["shard"] for e in retried}
    again = [e for e in events if e["event"] == "shard_started" and e["shard"] == started["shard"]][-1]
    assert again["attempt"] == 2 and again["node"] == head  # redone on the surviving node
    assert output_objects(out) == reference["files"]  # byte-identical to the clean run


def test_driver_killed_then_rerun_equals_the_clean_run(cluster, reference, capfd):
    out = f"{cluster['bucket']}/driver-killed"
    cmd = [str(BIN / "multimae-label"), str(REPO / "pipelines" / "pseudolabel.yaml"), f"input={cluster['data']}"]
    cmd += [f"output={out}", "actors=1", "batch_size=4", f"ray.address={cluster['cluster'].address}"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not committed_shards(out, "semseg") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    import ray

    deadline = time.time() + 120  # Ray ends the dead driver's actors and frees their CPUs
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.time() < deadline, "the killed driver's actors outlived it"
        time.sleep(0.1)
    assert fs.exists(lock_url(out)) and not fs.exists(fs.join(out, "manifest.json"))
    for mod in OUT_MODS:  # a committed shard is whole; anything else is never read
        for name in committed_shards(out, mod):
            assert fs.size(fs.join(out, mod, f"{name}.tar")) == read_stats(out, mod, name)["bytes"]
    summary = run(config(cluster["data"], out, "actors=1"))
    assert summary["shards_already_complete"] >= 1 and summary["manifest_updated"]
    assert "taking over the stale lock of multimae-label" in capfd.readouterr().err
    assert output_objects(out) == reference["files"]
    assert verify(out) == [] and not fs.exists(lock_url(out))
