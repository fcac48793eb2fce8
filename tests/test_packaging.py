"""The wheel works outside this checkout (issue 30): it carries every preset, recipe, sweep and eval task the code
looks up at run time, its metadata names every dependency and extra, and (slow) a clean venv with only torch and
the wheel runs ``helmlm --help``, ``helmlm params`` and ``helmlm smoke``, and every extra installs with a plain
``pip install``."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "helmlm"
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, cwd=out)
    (path,) = out.glob("helmlm-*.whl")
    return path


def test_the_wheel_carries_every_data_file_the_code_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix in (".yaml", ".jsonl", ".typed", ".html", ".css", ".js")]
    assert {"index.html", "chat.css", "chat.js"} <= {p.name for p in data}  # helmlm serve's page
    assert data and all(str(p.relative_to(PACKAGE.parent)) in names for p in data)
    sources = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")]
    assert all(s in names for s in sources)  # the remote-code generator reads the modules' sources
    assert not [n for n in names if n.startswith("tests/")]


def test_the_wheels_metadata_names_the_dependencies_and_extras(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode())
        entry_points = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
    requires = meta.get_all("Requires-Dist")
    base = {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires if "extra ==" not in r}
    assert {"torch", "transformers", "safetensors", "geoopt", "filelock", "tqdm"} <= base
    extras = set(meta.get_all("Provides-Extra"))
    assert {"data", "tensorboard", "eval", "plots", "convert", "peft", "analysis", "ricci", "serve", "dev"} <= extras
    assert not [r for r in requires if "GraphRicciCurvature" in r]  # it pins old numpy/scipy: not an extra
    assert "helmlm = helmlm.cli:main" in entry_points


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin"


@pytest.mark.slow
def test_a_clean_venv_with_torch_and_the_wheel_runs_the_command_line(wheel, tmp_path):
    """Only torch (the pinned CPU wheel) and the wheel with its dependencies: the presets and the smoke test work
    from the installed package, far from the checkout."""
    bin_dir = _venv(tmp_path / "venv")
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_SPEC], check=True, capture_output=True)
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    for args in (["--help"], ["params", "helm_mice_120m"], ["smoke"]):
        result = subprocess.run([str(bin_dir / "helmlm"), *args], capture_output=True, text=True, cwd=tmp_path,
                                env=env, timeout=600)
        assert result.returncode == 0, (args, result.stderr[-2000:])
    located = subprocess.run([str(bin_dir / "python"), "-c", "import helmlm; print(helmlm.__file__)"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout
    assert str(tmp_path / "venv") in located  # the installed copy, not this checkout


@pytest.mark.slow
def test_every_extra_installs_with_plain_pip(wheel, tmp_path):
    """Each extra resolves and installs together with torch, with no ``--no-deps`` step (pip's resolver would
    refuse conflicting pins, as GraphRicciCurvature's were)."""
    bin_dir = _venv(tmp_path / "venv")
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_SPEC], check=True, capture_output=True)
    extras = "data,tensorboard,eval,plots,convert,peft,analysis,ricci"
    result = subprocess.run([*pip, f"{wheel}[{extras}]"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    check = subprocess.run([str(bin_dir / "python"), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout[-3000:]
    imports = "import datasets, lm_eval, matplotlib, gguf, peft, ot, networkx, powerlaw, helmlm.analysis.ricci"
    result = subprocess.run([str(bin_dir / "python"), "-c", imports], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
