"""The install story: environment.yml and pyproject.toml list the same packages; the CLI and smoke mode work."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from mini_imagen import runtime

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r.replace(" ", "") for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_name(r): r.replace(" ", "") for r in pip_section if not r.startswith("-e")}
    assert listed == wanted, "environment.yml and pyproject.toml disagree: keep both lists in step"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert ci.strip().splitlines()[-1] == "make test"


@pytest.mark.parametrize(
    "env, expected",
    [({"MINI_IMAGEN_SMOKE": "1"}, True), ({"MINI_IMAGEN_SMOKE": "0", "CI": "true"}, False),
     ({"CI": "true"}, True), ({}, False)],
)
def test_smoke_mode_switch(monkeypatch, env, expected):
    monkeypatch.delenv("MINI_IMAGEN_SMOKE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert runtime.is_smoke_mode() is expected
    assert runtime.smoke(full=1000, small=3) == (3 if expected else 1000)


def test_pick_device_refuses_missing_gpu_clearly():
    if runtime.torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert runtime.pick_device().type in ("cpu", "mps")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        runtime.pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        runtime.pick_device("tpu")


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "mini_imagen.cli", "--help"], capture_output=True, text=True, check=True)
    for sub in ("generate", "train"):
        assert sub in out.stdout


def test_cli_unknown_option_is_one_clear_line():
    out = subprocess.run([sys.executable, "-m", "mini_imagen.cli", "generate", "a red circle", "--bogus"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "unrecognized arguments: --bogus" in out.stderr
    assert "Traceback" not in out.stderr


def test_every_public_name_resolves():
    import mini_imagen

    for name in mini_imagen.__all__:
        assert getattr(mini_imagen, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        mini_imagen.NotAThing  # noqa: B018
