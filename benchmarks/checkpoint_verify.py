"""What the checkpoint's file records cost: save_checkpoint with and without recording every file's size and CRC-32
in its marker, and load_checkpoint with and without verifying them, side by side, taking turns.

Two states: a MinAtar-like replay (two (100k, 10, 10, 4) bool frame arrays, 10% set, and 100k float32 rewards:
80 MB in memory, which orbax compresses) and 200 MB of random float32 (incompressible: the worst case for
checksumming). Each cell is the median of --repeats saves (or loads) into a new directory under --dir.

    python benchmarks/checkpoint_verify.py --repeats 5 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from moescale.train import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_step import section_text, write_section  # noqa: E402


def states() -> dict[str, dict]:
    rng = np.random.default_rng(0)
    frames = lambda: jnp.asarray(rng.random((100_000, 10, 10, 4)) < 0.1)  # noqa: E731
    return {"MinAtar-like replay, 80 MB": {"obs": frames(), "next_obs": frames(),
                                           "reward": jnp.asarray(rng.normal(size=100_000), jnp.float32)},
            "random float32, 200 MB": {"w": jnp.asarray(rng.normal(size=50_000_000), jnp.float32)}}


def measure(state: dict, repeats: int, root: Path) -> dict[str, float]:
    """Median seconds of a save with and without file records, and of a load with and without verification."""
    records, problems = ckpt._file_records, ckpt.checkpoint_problems
    found: dict[str, list[float]] = {"save, recorded": [], "save, not recorded": [], "load, verified": [],
                                     "load, not verified": []}
    size = 0
    try:
        for _ in range(repeats):
            for recorded in (True, False):
                where = Path(tempfile.mkdtemp(dir=root))
                ckpt._file_records = records if recorded else (lambda _: {})
                t0 = time.perf_counter()
                ckpt.save_checkpoint(where, 1, state, {})
                found["save, recorded" if recorded else "save, not recorded"].append(time.perf_counter() - t0)
                ckpt._file_records = records
                if recorded:
                    size = sum(p.stat().st_size for p in where.rglob("*") if p.is_file())
                    for verified in (True, False):
                        ckpt.checkpoint_problems = problems if verified else (lambda *_: [])
                        t0 = time.perf_counter()
                        ckpt.load_checkpoint(where, 1, state)
                        found["load, verified" if verified else "load, not verified"].append(
                            time.perf_counter() - t0)
                        ckpt.checkpoint_problems = problems
                shutil.rmtree(where)
    finally:
        ckpt._file_records, ckpt.checkpoint_problems = records, problems
    return {"bytes": size, **{k: statistics.median(v) for k, v in found.items()}}


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| state | on disk | save, records | save, none | ratio | load, verified | load, not | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['bytes'] / 2**20:,.1f} MiB | {r['save, recorded']:.3f} s | "
                     f"{r['save, not recorded']:.3f} s | {r['save, recorded'] / r['save, not recorded']:.2f}x | "
                     f"{r['load, verified']:.3f} s | {r['load, not verified']:.3f} s | "
                     f"{r['load, verified'] / r['load, not verified']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="saves and loads per cell")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoints go")
    parser.add_argument("--write", type=Path, default=None, help="markdown file whose section to update")
    args = parser.parse_args(argv)
    if args.repeats < 1 or not args.dir.is_dir():
        parser.error("--repeats must be >= 1 and --dir an existing directory")
    t0 = time.perf_counter()
    rows = {name: measure(state, args.repeats, args.dir) for name, state in states().items()}
    text = section_text("Checkpoint file records: save and load with and without them", "checkpoint_verify.py",
                        argv, f"median of {args.repeats} saves and loads per cell, the variants taking turns, "
                        f"{time.perf_counter() - t0:.0f} s in all.", table(rows))
    print(text)
    if args.write:
        write_section(args.write, text, "checkpoint_verify")
    return 0


if __name__ == "__main__":
    sys.exit(main())
