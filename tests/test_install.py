"""`pip install -e .` works (pyproject.toml), and then `import minisink` works from any folder.

The install is made from a copy of the package in a temporary folder, so that the checkout is not
touched, into a fresh virtual environment that sees this Python's packages (torch and the rest are
already there: no network, a few seconds) and uses this Python's pip and setuptools (a venv's own
bundled setuptools may be too old to build an editable wheel).

"This Python's packages" are those of the environment the tests run in, which is often itself a
virtual environment: `python -m venv --system-site-packages` would give the fresh one the *base*
interpreter's packages instead (no torch, perhaps a setuptools without `bdist_wheel`: issue 26). So
the fresh environment gets a .pth file that lists this environment's site-packages folders, after
its own."""
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def test_pip_install_editable_then_import_from_another_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "minisink", src / "minisink", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", tmp_path / "venv"], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    fresh_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() + [site.getusersitepackages()] if p != fresh_site]
    (Path(fresh_site) / "outer-environment.pth").write_text("".join(f"{p}\n" for p in ours))
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "-e", src], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import minisink, minisink.tools.cli, minisink.weights.load; print(minisink.__file__); "
             "print((minisink.tools.cli.__file__))")
    result = subprocess.run([python, "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(src / "minisink" / "__init__.py")
    assert sorted(p.name for p in src.iterdir()) == ["README.md", "minisink", "pyproject.toml"]  # nothing built there


def test_pyproject_declares_requirements_txt_plus_the_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert project["name"] == "minisink"
    assert sorted(project["dependencies"]) == sorted(r for r in requirements if r)
    assert "numpy>=1.23" in project["dependencies"]
    tests = [line.split("#")[0].strip() for line in (REPO / "requirements-test.txt").read_text().splitlines()]
    assert sorted(project["optional-dependencies"]["test"]) == sorted(t for t in tests if t and not t.startswith("-r"))
    assert "gguf" in project["optional-dependencies"]
