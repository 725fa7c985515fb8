"""What every benchmark shares: the command line, machine and version facts, medians, the table and JSON.

from benchmarks.common import parser, report
args = parser("sft", __doc__).parse_args()
report("sft", args.out, rows, summary, config=vars(args))
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", default=str(RESULTS / f"{name}.json"), help="JSON result path (default %(default)s)"
    )
    return p


def offline_env() -> None:
    """Benchmarks run where no model hub is reachable: fail at once instead of retrying for minutes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }
    if "torch" in sys.modules:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions() -> dict:
    from vlm_posttrain.store import package_versions

    return package_versions()


def median(values) -> float:
    return float(statistics.median(values))


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table (tabulate's); floats to 3 significant digits."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    print(tabulate(cells, headers=columns, tablefmt="plain", disable_numparse=True))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def report(name: str, out: str, rows: list[dict], summary: dict, config: dict) -> Path:
    """Write the JSON (machine, versions, config, per-run rows, summary) and say where."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "versions": versions(),
        "config": config,
        "summary": summary,
        "runs": rows,
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return path
