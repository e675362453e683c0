"""Helpers of the tests that run under a real Docker engine (tests/test_docker.py, the image;
tests/test_compose.py, the Compose stack): commands, the engine, the image built from this tree.
Their fixtures, `docker` and `image`, are in tests/conftest.py.

No image can be pulled on this project's machines: deploy/docker/base-image.sh makes the
Dockerfile's base from Debian's packages first (a real base image of that name is used as it is).
The image is tagged by a hash of what goes into it and rebuilt only when that changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "deploy" / "docker"
# what goes into the image (the build context of .dockerignore, and the base's recipe)
INPUTS = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "README.md",
    "deploy/docker/base-image.sh",
    "deploy/docker/requirements.py",
    "streamcast",
)
REPOSITORY = "streamcast"
TAG_PREFIX = "test-"

# the first build downloads TensorFlow: minutes, over the suite's per-test timeout
BUILD_TIMEOUT_S = 1800


def run(
    *args: str, timeout_s: float = 120, check: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, **kwargs)
    if check:
        assert out.returncode == 0, f"{' '.join(args)}: exit {out.returncode}\n{out.stderr[-3000:]}"
    return out


def answers(docker: str) -> bool:
    return run(docker, "info", timeout_s=30, check=False).returncode == 0


def need_root_and_tool(command: str, package: str) -> str:
    """The path of ``command``; the test is skipped where it cannot be had (not root, or no
    apt-get to install Debian's ``package``), and fails where it only was not installed."""
    path = shutil.which(command)
    if path is not None:
        return path
    if os.geteuid() != 0:
        pytest.skip(f"no {command}, and only root can install it")
    if shutil.which("apt-get") is None:
        pytest.skip(f"no {command}, and no apt-get to install Debian's {package}")
    pytest.fail(f"{command} is not installed (apt-get install -y {package}; .ci/run does it)")


def source_hash(base_id: str) -> str:
    """A hash of the base image and of every file the image is built from."""
    digest = hashlib.sha256(base_id.encode())
    for path in (ROOT / p for p in INPUTS):
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(ROOT)).encode() + b"\0")
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def build_image(docker: str, log_path: Path) -> str:
    """streamcast:test-HASH, built now unless an image of that tag exists."""
    base = run(str(DOCKER_DIR / "base-image.sh"), timeout_s=900)  # no-op when up to date
    from_line = next(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("FROM ")
    )
    base_id = run(docker, "image", "inspect", "-f", "{{.Id}}", from_line.split()[1]).stdout
    tag = f"{REPOSITORY}:{TAG_PREFIX}{source_hash(base_id.strip())}"
    if run(docker, "image", "inspect", tag, check=False).returncode == 0:
        return tag
    with open(log_path, "w") as log:
        # the legacy builder: no buildx plugin needed, and --network host for pip's registry
        built = subprocess.run(
            [docker, "build", "--network", "host", "-t", tag, str(ROOT)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
            timeout=BUILD_TIMEOUT_S - 300,
        )
    assert built.returncode == 0, f"{base.stdout}\ndocker build:\n{log_path.read_text()[-4000:]}"
    # earlier test builds: their layers under this one's are kept, the rest freed
    tags = run(docker, "image", "ls", REPOSITORY, "--format", "{{.Tag}}").stdout.split()
    stale = [f"{REPOSITORY}:{t}" for t in tags if t.startswith(TAG_PREFIX)]
    stale.remove(tag)
    if stale:
        run(docker, "image", "rm", *stale, check=False)
    return tag


def inspect(docker: str, container: str) -> dict:
    return json.loads(run(docker, "inspect", container).stdout)[0]
