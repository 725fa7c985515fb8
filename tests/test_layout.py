"""Project layout rules: the core package never imports Ray; every driver has a --help that answers at once."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every module of the core package, subpackages too (``soup.methods``): importing one imports its package.
CORE = REPO / "vlm_posttrain"
CORE_MODULES = sorted(
    ".".join(p.relative_to(CORE).with_suffix("").parts) for p in CORE.rglob("*.py") if p.stem != "__init__"
)
DRIVERS = sorted(p.stem for p in (REPO / "ray_jobs").glob("*.py") if p.stem not in ("__init__", "session"))


def test_core_package_does_not_import_ray():
    code = (
        "import sys\n"
        + "".join(f"import vlm_posttrain.{m}\n" for m in CORE_MODULES)
        + "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        + "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_drivers_import_no_model_library():
    """`--help` (and a driver's import) stays fast: torch, transformers, peft, trl and ray load where a stage runs."""
    code = (
        "import sys\n"
        + "".join(f"import ray_jobs.{d}\n" for d in DRIVERS)
        + "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'ray') if m in sys.modules)\n"
        + "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("driver", DRIVERS)
def test_driver_help(driver):
    out = subprocess.run(
        [sys.executable, "-m", f"ray_jobs.{driver}", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "config" in out.stdout
