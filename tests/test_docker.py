"""The Docker image, checked by reading it (no Docker engine here): its torch/torchvision pins equal
CI's and setup.cfg's upper bounds, its Lightning pin is inside setup.cfg's range, it installs
the package after the pinned torch as CI does, and it runs as a non-root user."""
import configparser
import re

from packaging.requirements import Requirement
from packaging.version import Version

from cli_support import ROOT

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def instructions(text: str) -> list:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]


def pins(text: str) -> dict:
    return dict(re.findall(r'"([A-Za-z_-]+)==([0-9][0-9.]*)"', text))


def install_requires() -> dict:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirements = [Requirement(line) for line in config["options"]["install_requires"].split("\n") if line.strip()]
    return {requirement.name: requirement.specifier for requirement in requirements}


def test_torch_and_torchvision_pins_equal_ci_and_the_upper_bounds_of_setup_cfg():
    docker, ci, allowed = pins(DOCKERFILE), pins(CI), install_requires()
    for package in ("torch", "torchvision"):
        assert docker[package] == ci[package], package
        upper = max(Version(spec.version) for spec in allowed[package] if spec.operator == "<=")
        assert Version(docker[package]) == upper, package  # the newest version setup.cfg allows
        assert allowed[package].contains(docker[package])


def test_lightning_pin_is_inside_setup_cfg_range():
    assert install_requires()["lightning"].contains(pins(DOCKERFILE)["lightning"])


def test_image_installs_pinned_torch_then_the_package_and_runs_as_a_non_root_user():
    steps = instructions(DOCKERFILE)
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11")  # CI's Python
    runs = [arguments for instruction, arguments in steps if instruction == "RUN"]
    torch_step = next(i for i, run in enumerate(runs) if '"torch==' in run)
    package_step = next(i for i, run in enumerate(runs) if re.search(r'"\.(\[[a-z,]+\])?"', run))
    assert torch_step < package_step  # as .ci/run: the pinned torch first, so pip keeps it
    users = [arguments for instruction, arguments in steps if instruction == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    copied = " ".join(arguments for instruction, arguments in steps if instruction == "COPY")
    for needed in ("setup.py", "setup.cfg", "fewshot_lightning", "configs", "cluster"):
        assert needed in copied  # docker/README.md runs configs/ and cluster/ from the image
    assert ("ENTRYPOINT", '["fewshot-lightning"]') in steps
