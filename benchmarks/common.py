"""What the benchmark scripts share: a row of the results table, the table as printed, the line
that ends a run, and the machine block of the ``--json`` output (``run.py`` reads all three).

Standard library only at import time.  ``bench_peers.py`` imports this module inside functions
only: multiprocessing's spawn children and Dask's workers import that script again, and an import
at its top would be counted in their start.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

nan = float("nan")


def make_row(figure: str, value: float, base: float, unit: str, goal: str, ok: bool | None = None) -> dict:
    """One row of a benchmark's table: ratio = value / baseline (``nan`` if either is missing or 0)."""
    ratio = value / base if base and base == base and value == value else nan
    return dict(figure=figure, value=value, baseline=base, ratio=ratio, unit=unit, goal=goal,
                result="-" if ok is None else "PASS" if ok else "FAIL")


def fmt(x: float, width: int) -> str:
    if isinstance(x, float) and x != x:
        return f"{'-':>{width}}"
    return f"{x:>{width}.3f}" if abs(x) < 1e5 else f"{x:>{width}.0f}"


def print_table(rows: list[dict]) -> None:
    """The rows as a plain-text table, each text column as wide as its longest entry."""
    if not rows:
        return
    fw, uw, gw = (max(len("figure"), *(len(r[k]) for r in rows)) for k in ("figure", "unit", "goal"))
    head = f"{'figure':<{fw}} {'value':>9} {'baseline':>9} {'ratio':>7}  {'unit':<{uw}} {'goal':<{gw}} result"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['figure']:<{fw}} {fmt(r['value'], 9)} {fmt(r['baseline'], 9)} {fmt(r['ratio'], 7)}  "
              f"{r['unit']:<{uw}} {r['goal']:<{gw}} {r['result']}")


def run_line(quick: bool, seconds: float, load_start: float) -> str:
    """How long the run took, on what, under what load."""
    return (f"{'quick' if quick else 'full'} run, {seconds:.0f} s; {platform.python_implementation()} "
            f"{platform.python_version()}, {os.cpu_count()} cpus, {platform.platform()}; "
            f"load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")


def source_fingerprint(package: Path | None = None) -> dict:
    """Which nbbgtask code was measured: the commit, the files that differ from it, a hash of its source."""
    import hashlib

    if package is None:
        import nbbgtask

        package = Path(nbbgtask.__file__).parent
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(package.glob("*.py")))).hexdigest()[:16]
    return {"commit": git(package, "rev-parse", "HEAD"), "changed_files": git(package, "status", "--porcelain", "--", "."),
            "sha256_16": digest}


def git(where: Path, *args: str) -> str | None:
    """What ``git args`` prints in ``where``, or ``None`` if git is missing or fails."""
    import subprocess

    try:
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=20)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions of these distributions (``None``: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine(load_start: float, packages: tuple[str, ...], **extra) -> dict:
    """The machine block of a benchmark's ``--json``: the machine, its load, the versions measured."""
    import psutil

    return {"platform": platform.platform(), "python": sys.version, "cpu_count": os.cpu_count(),
            "memory_gb": psutil.virtual_memory().total / 2**30, "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
            **versions(("nbbgtask", *packages)), "nbbgtask_source": source_fingerprint(), **extra}


def write_json(path: str, machine_block: dict, cfg: dict, seconds: float, res: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine_block, "config": cfg, "seconds": seconds, "results": res, "table": rows},
                  f, indent=2, default=str)
    print(f"wrote {path}")
