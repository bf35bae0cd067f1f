"""Parameter snapshots for analysis: the online parameters of every seed, kept every analysis_every
iterations in run_dir/snapshots/params_{iteration:08d}.npz (one array per parameter, leading seed axis S,
keyed by its path in the tree). Written to a temporary name and renamed, so a listed snapshot is complete.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moescale import checks

SNAPSHOT_DIR = "snapshots"
_NAME = re.compile(r"params_(\d{8})\.npz")


def _key(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def save_snapshot(run_dir: Path, iteration: int, params: Any) -> Path:
    """Write stacked params (leaves (S, ...)) of `iteration`; returns the file's path."""
    directory = Path(run_dir) / SNAPSHOT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {_key(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    final = directory / f"params_{iteration:08d}.npz"
    tmp = directory / (final.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(final)
    return final


def list_snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every complete snapshot, oldest first."""
    directory = Path(run_dir) / SNAPSHOT_DIR
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def load_snapshot(path: Path, like: Any) -> Any:
    """Stacked params shaped like `like` (a tree of one seed's params) from a snapshot file.

    ValueError if the file's parameters do not match `like` (another network), or if it is damaged (an npz is a
    zip file: a garbled member fails its CRC-32 when read, a truncated file its directory)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"snapshot={str(path)!r}: damaged or unreadable ({checks.one_line(err)}); delete it to "
                         "analyze the run without it") from None
    leaves = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]:
        key = _key(key_path)
        if key not in stored or stored[key].shape[1:] != tuple(leaf.shape):
            raise ValueError(f"snapshot={str(path)!r}: parameter {key} is missing or has another shape "
                             "(the snapshot is of another network)")
        leaves.append(jnp.asarray(stored.pop(key)))
    if stored:
        raise ValueError(f"snapshot={str(path)!r}: parameters {sorted(stored)[:3]} are not in the network")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
