"""Shared fixtures: one intra-op thread for tiny models, and a real S3 endpoint (moto's server) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import torch

S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
# Every Ray node and driver the tests start, in this process or a child, uses 127.0.0.1 and no other address
# (Ray reads this when it is imported; it also keeps `ray start` from adding worker nodes, which no test does).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread avoids spin-waiting on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    """`python -m moto.server` on a free port of 127.0.0.1 for the whole session: its endpoint URL."""
    pytest.importorskip("moto", reason="the S3 tests need the test extra (moto[server], s3fs)")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)  # noqa: S310 (loopback only)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not start on {url}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_environment(endpoint: str) -> dict[str, str]:
    """The standard S3 environment that points every botocore client (s3fs included) at `endpoint`."""
    return dict(zip(S3_ENV, (endpoint, "testing", "testing", "us-east-1")))


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch) -> str:
    """A new, empty bucket on the moto server, with the S3 environment set for this test: 's3://<bucket>'."""
    pytest.importorskip("s3fs", reason="the S3 tests need the test extra (s3fs)")
    for key, value in s3_environment(moto_endpoint).items():
        monkeypatch.setenv(key, value)
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"
