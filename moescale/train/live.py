"""Live logging of a run's metric rows, once per iteration, as the driver writes them to metrics.csv.

    log: [tensorboard]   RUN_DIR/tensorboard/seed_<s>/   one event directory per seed, each scalar under its
                                                        metrics.csv column name, at step = agent steps
    log: [wandb]         one Weights & Biases run (RUN_DIR/wandb/), each scalar as <column>/seed_<s>; offline
                         unless WANDB_MODE says otherwise (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it);
                         a resumed run goes on in the same W&B run

Both are optional extras (pip install -c requirements.lock -e '.[log]'). Analysis columns are logged on the
iterations that measure them.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from moescale.config import TrainConfig

NOT_LOGGED = ("iteration", "seed", "agent_steps")  # the row's coordinates, not measurements


class LiveLog(Protocol):
    def write(self, rows: list[dict[str, Any]]) -> None:
        """Log one iteration's rows (one per seed)."""

    def close(self) -> None:
        """Flush and release."""


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k not in NOT_LOGGED and math.isfinite(float(v))}


class TensorBoardLog:
    """One TensorBoard event directory per seed (tensorboardX writes the events; TensorBoard reads them)."""

    def __init__(self, config: TrainConfig, out: Path):
        from tensorboardX import SummaryWriter

        self.writers = [SummaryWriter(logdir=str(out / "tensorboard" / f"seed_{s}")) for s in range(config.seeds)]

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            writer = self.writers[row["seed"]]
            for name, value in _scalars(row).items():
                writer.add_scalar(name, value, global_step=row["agent_steps"])
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class WandbLog:
    """One Weights & Biases run per run directory; its id is kept in RUN_DIR/wandb_id so a resume continues it."""

    def __init__(self, config: TrainConfig, out: Path):
        import wandb

        id_file = out / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project="moescale", dir=str(out), name=out.name, id=run_id, resume="allow",
                              config=config.to_dict(), mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=wandb.Settings(silent=True))

    def write(self, rows: list[dict[str, Any]]) -> None:
        logged = {f"{name}/seed_{row['seed']}": value for row in rows for name, value in _scalars(row).items()}
        self.run.log(logged, step=rows[0]["agent_steps"])

    def close(self) -> None:
        self.run.finish()


LOGGERS = {"tensorboard": (TensorBoardLog, "tensorboardX"), "wandb": (WandbLog, "wandb")}


def check_logs(config: TrainConfig) -> None:
    """ValueError naming the field when a live log that config.log asks for has no package installed (called
    before the run directory is touched)."""
    import importlib.util

    for name in config.log:
        package = LOGGERS[name][1]
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"log={list(config.log)!r}: {name} needs the {package} package; install moescale's log "
                             "extra: pip install -c requirements.lock -e '.[log]'")


def open_logs(config: TrainConfig, out: Path) -> list[LiveLog]:
    """The live logs config.log asks for, writing into the run directory `out` (train() has run check_logs
    before touching it)."""
    return [LOGGERS[name][0](config, out) for name in config.log]
