"""How long a study's dry run takes, as a user runs it: `moescale study SPEC --out DIR --dry-run` in a new process
with an empty timing cache, timed to the plan on screen (printed whole, flushed, before the estimate) and to its
exit, with the CPU time it used; then once more with the cache it filled.

--roots takes checkouts of moescale to run side by side (PYTHONPATH; e.g. a `git worktree` of an older commit
next to this one), taking turns, so a change is measured against its parent on the same machine at the same time.

    python benchmarks/dry_run.py --roots /tmp/before,. --turns 2 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_step import section_text, write_section  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "studies" / "paper-fig1-minatar.yaml"


def commit(root: Path) -> str:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or str(root)


def dry_run(root: Path, spec: Path, cache: Path, out: Path) -> dict[str, float]:
    """Seconds to the plan's count line and to the exit, and CPU seconds, of one dry run of `spec` with moescale
    taken from `root` and the timing cache in `cache`."""
    env = dict(os.environ, PYTHONPATH=str(root), MOESCALE_CACHE_DIR=str(cache))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "moescale.cli", "study", str(spec), "--out", str(out),
                             "--dry-run", "--no-progress"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    plan = float("nan")
    for line in proc.stdout:
        if " run groups (" in line:
            plan = time.perf_counter() - t0
    if proc.wait() != 0:
        raise SystemExit(f"dry run with moescale from {root} exited {proc.returncode}")
    total = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"plan": plan, "total": total, "cpu": cpu}


def run(roots: list[Path], spec: Path, turns: int) -> list[tuple[str, str, dict[str, float]]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for turn in range(1, turns + 1):
            for i, root in enumerate(roots):
                cache = Path(tmp) / f"cache-{turn}-{i}"  # empty: every shape timed
                rows.append((commit(root), f"empty cache, turn {turn}",
                             dry_run(root, spec, cache, Path(tmp) / "out")))
        for i, root in enumerate(roots):
            rows.append((commit(root), "cache filled by turn 1",
                         dry_run(root, spec, Path(tmp) / f"cache-1-{i}", Path(tmp) / "out")))
    return rows


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    lines = ["| moescale at | run | plan on screen | whole dry run | CPU |", "|---|---|---|---|---|"]
    for code, what, r in rows:
        lines.append(f"| {code} | {what} | {r['plan']:.1f} s | {r['total']:.1f} s | {r['cpu']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=SPEC, help="study spec (default paper-fig1-minatar)")
    parser.add_argument("--roots", default=".", help="comma list of moescale checkouts, run side by side")
    parser.add_argument("--turns", type=int, default=2, help="empty-cache dry runs per checkout, taking turns")
    parser.add_argument("--write", type=Path, default=None, help="markdown file whose section to update")
    parser.add_argument("--section", default="dry_run", help="the section of --write to replace (default dry_run)")
    args = parser.parse_args(argv)
    roots = [Path(r).resolve() for r in args.roots.split(",") if r]
    if args.turns < 1 or not roots or not all((r / "moescale" / "cli.py").is_file() for r in roots):
        parser.error("--turns must be >= 1 and --roots a comma list of moescale checkouts")
    if not args.spec.is_file():
        parser.error(f"--spec {args.spec}: no such file")
    t0 = time.perf_counter()
    rows = run(roots, args.spec.resolve(), args.turns)
    text = section_text(f"A study's dry run ({args.spec.name})", "dry_run.py", argv,
                        f"one process per dry run, checkouts taking turns, {time.perf_counter() - t0:.0f} s in all.",
                        table(rows))
    print(text)
    if args.write:
        write_section(args.write, text, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
