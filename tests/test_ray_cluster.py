"""The two cluster entry points of the labeling job, for real, on this machine.

- `ray job submit --working-dir . -- multimae-label pipelines/pseudolabel.yaml` against a `ray start --head`.
- `ray up` / `ray submit pipelines/pseudolabel.yaml pipelines/pseudolabel.py` / `ray down` with the shipped
  cluster config on Ray's local provider, reached over SSH on 127.0.0.1 (`.ci/setup_ssh.sh` provides sshd
  and the key). The test derives its config from the shipped one, changing only what must differ on a
  shared test machine: the key path, a private Ray temp dir and free ports (and no `ray stop`, which would
  end every Ray on the machine), and setup commands that put this venv on the login PATH instead of
  installing the project into a new one.

Every Ray process a test starts is killed by process group afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from test_labeling_job import _kill_ray_of, make_rgb_set

from shards.reader import iter_shard

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SSH_KEY = Path(os.environ.get("MULTIMAE_SSH_KEY", "/tmp/multimae-ssh/id_ed25519"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", **extra)


def check_labels(data: Path, keys: list[list[str]]) -> None:
    for i, shard_keys in enumerate(keys):
        samples = list(iter_shard(str(data), f"shard-{i:06d}", ["rgb", "depth", "semseg"]))
        assert [s["__key__"] for s in samples] == shard_keys
        assert all(s["depth"].shape == s["rgb"].shape[:2] == s["semseg"].shape for s in samples)


@pytest.mark.slow
def test_ray_job_submit_to_a_running_cluster(tmp_path):
    data = tmp_path / "data"
    keys = make_rgb_set(data, shards=2, per_shard=10)
    temp = Path(f"/tmp/mmj-{uuid.uuid4().hex[:6]}")
    dash = free_port()
    env = ray_env(RAY_AUTH_MODE="disabled")
    start = [
        "ray",
        "start",
        "--head",
        f"--port={free_port()}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=2",
        f"--temp-dir={temp}",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=180, start_new_session=True)
        res = subprocess.run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dash}",
                "--working-dir",
                str(REPO),
                "--",
                "multimae-label",
                "pipelines/pseudolabel.yaml",
                f"input={data}",
                "actors=1",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        _kill_ray_of(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 labeled, 0 already complete, 0 failed (of 2)" in res.stdout
    check_labels(data, keys)


def ssh_ready() -> str | None:
    """None when root@127.0.0.1 accepts SSH_KEY, else why not."""
    if not SSH_KEY.is_file():
        return f"no SSH key at {SSH_KEY} (run .ci/setup_ssh.sh as root)"
    res = subprocess.run(
        [
            "ssh",
            "-i",
            str(SSH_KEY),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
            "root@127.0.0.1",
            "true",
        ],
        capture_output=True,
        text=True,
    )
    return None if res.returncode == 0 else f"ssh root@127.0.0.1 failed: {res.stderr.strip()[-300:]}"


@pytest.mark.slow
def test_ray_up_submit_down_on_a_local_provider_cluster(tmp_path):
    reason = ssh_ready()
    if reason:
        pytest.skip(f"cluster-launcher test needs SSH to 127.0.0.1: {reason}")
    data = tmp_path / "data"
    keys = make_rgb_set(data, shards=2, per_shard=10)
    cfg = yaml.safe_load((REPO / "pipelines" / "pseudolabel.yaml").read_text())
    temp, gcs, marker = Path(f"/tmp/mmc-{uuid.uuid4().hex[:6]}"), free_port(), "# multimae-ci-cluster-test"
    cfg["cluster_name"] = f"multimae-test-{temp.name}"
    cfg["auth"]["ssh_private_key"] = str(SSH_KEY)
    cfg["setup_commands"] = [
        f"grep -q -- '{marker}' ~/.bashrc || echo 'export PATH={VENV_BIN}:$PATH {marker}' >> ~/.bashrc"
    ]
    cfg["head_start_ray_commands"] = [
        f"ray start --head --port={gcs} --dashboard-port={free_port()} --ray-client-server-port={free_port()} "
        f"--dashboard-agent-listen-port={free_port()} --num-cpus=2 --temp-dir={temp} --dashboard-host=127.0.0.1 "
        "--disable-usage-stats --autoscaling-config=~/ray_bootstrap_config.yaml"
    ]
    cfg["file_mounts"] = {"~/multimae-toolkit": str(REPO)}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = ray_env()
    try:
        up = subprocess.run(
            ["ray", "up", "-y", "--no-config-cache", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
            cwd=REPO,
        )
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        sub = subprocess.run(
            [
                "ray",
                "submit",
                str(path),
                "pipelines/pseudolabel.py",
                f"input={data}",
                "actors=1",
                f"ray.address=127.0.0.1:{gcs}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
            cwd=REPO,
        )
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        assert "2 labeled, 0 already complete, 0 failed (of 2)" in sub.stdout + sub.stderr
        down = subprocess.run(
            ["ray", "down", "-y", str(path)], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
        )
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    finally:
        _kill_ray_of(str(temp))  # `ray down` on the local provider leaves the head's Ray running
        shutil.rmtree(temp, ignore_errors=True)
        bashrc = Path.home() / ".bashrc"
        if bashrc.exists():
            bashrc.write_text("".join(line for line in bashrc.read_text().splitlines(True) if marker not in line))
        shutil.rmtree(Path.home() / "multimae-toolkit", ignore_errors=True)
        (Path.home() / "pseudolabel.py").unlink(missing_ok=True)
    check_labels(data, keys)
