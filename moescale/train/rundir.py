"""A run directory, read and written: its config, metric rows, summary and status; the machine it ran on.

    RUN_DIR/config.yaml       the resolved config (loadable; fields it predates read back as it trained)
    RUN_DIR/metrics.csv       one row per iteration and seed (ROW_FIELDS, then analysis columns), and the same
    RUN_DIR/metrics.parquet   as parquet
    RUN_DIR/summary.json      written when the run finishes
    RUN_DIR/checkpoints/      moescale.train.checkpoint
    RUN_DIR/snapshots/        moescale.train.snapshots (analysis)

Every file is written to a temporary name and renamed, so a crash never leaves a half-written file behind. Both
trainers and the study, analysis and CLI read run directories through here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from moescale import checks
from moescale.checks import RunError
from moescale.config import LEGACY_NETWORK_DEFAULTS, TrainConfig
from moescale.train.checkpoint import latest_checkpoint

ROW_FIELDS = ("iteration", "seed", "agent_steps", "episodes", "train_return", "eval_return", "loss", "mean_q",
              "steps_per_second", "wall_seconds")
INT_FIELDS = ("iteration", "seed", "agent_steps", "episodes")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def damaged(path: Path, err: BaseException, remedy: str) -> RunError:
    """The one-line error for a file moescale wrote that no longer reads back."""
    return RunError(f"{path}: damaged or unreadable ({checks.one_line(err)}); {remedy}")


def read_yaml(path: Path, remedy: str) -> Any:
    """A YAML file moescale wrote, parsed; RunError naming it (and `remedy`) when it does not read back."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:  # ValueError: UnicodeDecodeError
        raise damaged(path, err, remedy) from None


def read_json(path: Path, remedy: str) -> Any:
    """A JSON file moescale wrote, parsed; RunError naming it (and `remedy`) when it does not read back."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise damaged(path, err, remedy) from None


def load_run_config(out: Path) -> TrainConfig:
    """The resolved config a run directory was started with; network fields it predates take the values the run
    trained with (LEGACY_NETWORK_DEFAULTS), not today's defaults. RunError naming config.yaml when it is damaged."""
    path = out / "config.yaml"
    remedy = "the run's config is lost with it: start over with --force, or restore the file"
    stored = read_yaml(path, remedy)
    try:
        return TrainConfig.from_dict(with_legacy_defaults(stored))
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise damaged(path, err, remedy) from None


def with_legacy_defaults(stored: Any) -> Any:
    """A stored config mapping with each network field it lacks set to what it meant when it was written."""
    if not isinstance(stored, dict) or not isinstance(stored.get("network"), dict):
        return stored
    return {**stored, "network": {**LEGACY_NETWORK_DEFAULTS, **stored["network"]}}


def no_run(out: Path) -> RunError:
    return RunError(f"--resume {out}: no run there to resume (no config.yaml)")


def resumable_config(out: Path) -> TrainConfig:
    """The stored config of the run in `out` (RunError when there is none). A run with no checkpoint yet resumes
    by starting over from it."""
    if not (out / "config.yaml").exists():
        raise no_run(out)
    return load_run_config(out)


def check_out_dir(flag: str, out: Path) -> None:
    """RunError, before anything is written, when `out` cannot be a directory moescale writes into: it is a file,
    lies under one, has a name longer than its filesystem allows, or its nearest existing folder is read-only."""
    given, out = out, Path(out).absolute()
    existing = next(p for p in out.parents if _exists(p))
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX") if existing.is_dir() else 255
    except (OSError, ValueError):
        name_max = 255
    for part in out.parts:
        if len(os.fsencode(part)) > name_max:
            raise RunError(f"{flag} {given}: the name {part[:24]}... is {len(os.fsencode(part))} bytes, over the "
                           f"{name_max} its filesystem allows")
    if _exists(out):
        existing = out
    if existing == out and not out.is_dir():
        raise RunError(f"{flag} {given}: is a file, not a directory (give a directory)")
    if not existing.is_dir():
        raise RunError(f"{flag} {given}: {existing} is a file, so nothing can be created under it")
    if not os.access(existing, os.W_OK):
        raise RunError(f"{flag} {given}: {existing} is not writable (a read-only filesystem, or no permission)")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long, say
        return False


def prepare_run_dir(config: TrainConfig, out: Path, resume: bool, force: bool) -> TrainConfig:
    """Validate the output directory against the request and return the config to run."""
    if resume:
        return resumable_config(out)
    check_out_dir("--out", out)
    has_run = (out / "config.yaml").exists()
    if out.exists() and any(out.iterdir()):
        if not force:
            what = "a run" if has_run else "other files"
            raise RunError(f"--out {out}: holds {what} already; pass --resume to continue it or --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    return config


def raise_budget(out: Path, steps: int) -> TrainConfig:
    """Raise the budget of the run in `out` to `steps` agent steps per seed (`--resume RUN_DIR --steps N`) by
    rewriting its config.yaml; nothing else of the run changes, so it goes on as a run started with `steps`
    would have. A game list is extended one game directory at a time."""
    from moescale.envs.host import GAME_LISTS
    from moescale.presets import apply_overrides

    stored = resumable_config(out)
    if stored.env in GAME_LISTS:
        raise RunError(f"--steps: {out} holds the game list {stored.env}; extend each game's directory in it "
                       f"(--resume {out}/GAME --steps N)")
    if steps < stored.steps:
        raise RunError(f"--steps={steps}: below the run's steps={stored.steps}; a resumed run can only go on")
    if steps == stored.steps:
        return stored
    try:
        config = apply_overrides(stored, [f"steps={steps}"])
    except ValueError as e:
        raise RunError(str(e)) from None
    write_atomic(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    return config


def read_rows(path: Path, upto_iteration: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as f:
        rows = [{k: float(v) if k not in INT_FIELDS else int(v) for k, v in row.items()}
                for row in csv.DictReader(f)]
    return [r for r in rows if r["iteration"] <= upto_iteration]


def write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    # Analysis metrics exist on some iterations only: every row gets every column, NaN where not measured.
    fields = list(dict.fromkeys([*ROW_FIELDS, *(k for r in rows for k in r)]))
    rows = [{k: r.get(k, math.nan) for k in fields} for r in rows]
    tmp = out / "metrics.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / "metrics.csv")
    table = pa.Table.from_pylist(rows) if rows else pa.table({k: [] for k in ROW_FIELDS})
    pq.write_table(table, out / "metrics.parquet.tmp")
    (out / "metrics.parquet.tmp").replace(out / "metrics.parquet")


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("moescale", "jax", "jaxlib", "flax", "optax", "gymnax", "rlax", "numpy", "ale-py", "gymnasium"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def device_name() -> str:
    """The device the program runs on, in words, with the host CPU (see `host_cpu`)."""
    dev = jax.devices()[0]
    return f"{dev.platform}:{dev.device_kind} x{jax.device_count()} ({os.cpu_count()} host cores, {host_cpu()})"


def host_cpu(cpuinfo: str | None = None) -> str:
    """The host CPU's model and widest vector unit, e.g. "AMD EPYC, AVX-512", from /proc/cpuinfo (or the text given).

    Why: XLA:CPU's matmul kernels pick their code path by the vector unit, so the same run gives different float
    rounding, hence different returns, on an AVX2 and an AVX-512 machine (the MinAtar demo's dense seeds did);
    a result is bitwise reproducible on one machine.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    pairs = (line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in pairs}  # the last CPU's fields: all CPUs' match
    model = fields.get("model name") or fields.get("CPU part") or platform.machine()
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    for flag, unit in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sve", "SVE"), ("asimd", "NEON")):
        if flag in flags:
            return f"{model}, {unit}"
    return model


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Write summary.json (the run is finished once it exists)."""
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))


def run_status(run_dir: Path) -> str:
    """pending (never started), started (no checkpoint yet), interrupted (resumable), failed, or done."""
    if (run_dir / "summary.json").exists():
        return "done"
    if (run_dir / "error.json").exists():
        return "failed"
    if (run_dir / "config.yaml").exists() and latest_checkpoint(run_dir / "checkpoints") is not None:
        return "interrupted"
    return "started" if run_dir.exists() else "pending"
