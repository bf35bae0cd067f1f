"""Crash-safe checkpoints of a training-state pytree (all arrays) plus a small JSON metadata dict.

Layout of one checkpoint, `run_dir/ckpt_{step:08d}/`:

    arrays/         orbax StandardCheckpointer tree {"leaf_000000": array, ...}: the state's leaves in
                    flatten order; typed PRNG keys are stored as their raw key data (uint32)
    manifest.json   format, step, and per leaf its pytree path, shape, dtype (and key implementation)
    meta.json       the caller's metadata dict
    host/           optional host arrays (name.npy), e.g. the Atari trainer's frame replay: loaded with numpy
                    (load_host_arrays), never placed on a device
    COMPLETE        marker, written last: the step, and the size and CRC-32 of every other file as written

Damage: a file of a checkpoint truncated, garbled or deleted after it was written (a disk or copy gone wrong, a
hand edit) no longer matches the sizes and checksums in its marker. `checkpoint_problems` names such files and
`load_checkpoint` verifies before it reads, so no damaged file reaches orbax (which fails deep in tensorstore,
or reads garbage); a resume skips a damaged checkpoint for the newest intact one (moescale.train.driver).
Checkpoints written before the marker recorded files are verified by loading them: any failure then counts as
damage.

Crash safety: everything is written into a temporary directory `.tmp_ckpt_*`, every file and directory in
it is fsynced, the marker is written, and only then is the directory renamed to its final name (an atomic
rename on POSIX) and the parent directory fsynced. A final-named directory therefore always holds a whole
checkpoint; latest_checkpoint also insists on the marker, so a directory copied or tampered with halfway is
ignored too. Older checkpoints are deleted only after the new one is in place, by renaming them to a
`.trash_ckpt_*` name first so that an interrupted deletion never leaves a half-deleted `ckpt_*`.

The pytree structure is not stored by orbax: it comes from `like` at load time, and the manifest's paths,
shapes and dtypes are checked against it, so a mismatch raises one clear ValueError instead of orbax's
silent casts or deep tensorstore errors.

Why orbax's CheckpointManager does not replace the commit protocol above (read in orbax-checkpoint 0.12.8,
_src/path/atomicity.py and checkpoint_manager.py): its save also writes into a temporary directory renamed
when done, but nothing is fsynced before the rename (files or parent directory), so after a power cut a
final-named step may hold empty or missing files; its deletion of old steps is an rmtree of the final-named
directory, so a kill in the middle leaves a partial step under a step's name; and its restore takes the
stored shapes and dtypes rather than refusing a mismatch with `like`. orbax still writes and reads the arrays
(StandardCheckpointer): what moescale adds is only the ordering of fsyncs, renames and deletions.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moescale import checks

FORMAT = "moescale-checkpoint-v1"
MARKER = "COMPLETE"
_NAME = re.compile(r"^ckpt_(\d{8,})$")  # {step:08d} grows past 8 digits from step 10^8 on
_TMP_PREFIX = ".tmp_ckpt_"
_TRASH_PREFIX = ".trash_ckpt_"
_ARRAYS = "arrays"
_HOST = "host"
_HOST_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_DAMAGED_PREFIX = "damaged_"  # a damaged checkpoint set aside (kept to look at, never loaded)


class DamagedCheckpoint(checks.RunError):
    """A checkpoint's files differ from what was written; the message is one line naming them."""


# ------------------------------------------------------------------------------------------------- helpers


def _ckpt_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"ckpt_{step:08d}"


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _flatten(tree: Any, name: str) -> tuple[list[Any], list[dict[str, Any]], Any]:
    """Leaves, their specs {path, shape, dtype}, and the treedef; refuses leaves that are not arrays."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves, specs = [], []
    for path, leaf in with_paths:
        where = name + jax.tree_util.keystr(path)
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            checks.fail(where, leaf, "must be an array (jax or numpy) or a jax.ShapeDtypeStruct")
        leaves.append(leaf)
        specs.append({"path": jax.tree_util.keystr(path), "shape": list(leaf.shape), "dtype": str(leaf.dtype)})
    return leaves, specs, treedef


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first), so the data is on disk before the marker."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for filename in filenames:
            _fsync(Path(dirpath) / filename)
        _fsync(Path(dirpath))


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_records(root: Path) -> dict[str, list[int]]:
    """{relative path: [bytes, CRC-32]} of every file under root."""
    records = {}
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            path = Path(dirpath) / filename
            records[path.relative_to(root).as_posix()] = [path.stat().st_size, _crc32(path)]
    return dict(sorted(records.items()))


def _remove(path: Path) -> None:
    """Delete a directory by renaming it to a trash name first, so no half-deleted ckpt_* ever exists."""
    trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_leftovers(run_dir: Path) -> None:
    """Delete temporaries and trash left by a save that was killed (they are never loaded, only disk)."""
    for entry in run_dir.iterdir():
        if entry.is_dir() and entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)


def _complete_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in run_dir, ascending."""
    if not run_dir.is_dir():
        return []
    steps = []
    for entry in run_dir.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir() and (entry / MARKER).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def _meta_json(meta: Any) -> str:
    if not isinstance(meta, dict):
        checks.fail("meta", type(meta).__name__, "must be a dict")
    text = ""
    try:
        text = json.dumps(meta, indent=1)
    except (TypeError, ValueError) as err:
        checks.fail("meta", meta, f"must be JSON-serialisable ({err})")
    return text


_previous_unraisable: Any = None


def _unraisable(unraisable: Any) -> None:
    """sys.unraisablehook that drops one report: when an orbax save fails (a full disk), orbax closes its event
    loop while tensorstore still has writes in flight, and each of their completions, calling into the closed
    loop, prints a "RuntimeError: Event loop is closed" traceback (tens of them); the save's own error is raised
    and reported once. Everything else goes to the hook it replaced."""
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
        return
    (_previous_unraisable or sys.__unraisablehook__)(unraisable)


@contextlib.contextmanager
def _orbax_quiet() -> Any:
    """orbax logs a failure in its background threads (a full disk, a damaged file) with a traceback through
    the absl logger before it raises the same error to its caller; moescale reports that error once, in a line.
    The drop of closed-loop reports (`_unraisable`) stays installed: they arrive after the failed call returns."""
    global _previous_unraisable
    if sys.unraisablehook is not _unraisable:
        _previous_unraisable, sys.unraisablehook = sys.unraisablehook, _unraisable
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _write_arrays(directory: Path, leaves: list[Any]) -> None:
    # Typed keys go in as their uint32 key data: the format then does not depend on orbax's key support.
    tree = {f"leaf_{i:06d}": jax.random.key_data(x) if _is_key(x) else x for i, x in enumerate(leaves)}
    if not tree:
        return
    checkpointer = ocp.StandardCheckpointer()
    with _orbax_quiet():
        try:
            checkpointer.save(directory, tree)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()


def _check_like(stored: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> None:
    """Raise a one-line ValueError when `like` differs from the checkpoint in structure, shape or dtype."""
    stored_paths, wanted_paths = [s["path"] for s in stored], [w["path"] for w in wanted]
    if stored_paths != wanted_paths:
        missing = [p for p in stored_paths if p not in set(wanted_paths)]
        extra = [p for p in wanted_paths if p not in set(stored_paths)]
        checks.fail(
            "like",
            f"{len(wanted_paths)} leaves",
            f"must have the checkpoint's {len(stored_paths)} leaves in the same order "
            f"(saved but not in like: {missing[:3]}, in like but not saved: {extra[:3]})",
        )
    for s, w in zip(stored, wanted, strict=True):
        if s["shape"] != w["shape"]:
            checks.fail(f"like{w['path']}.shape", tuple(w["shape"]), f"must be {tuple(s['shape'])} as saved")
        if s["dtype"] != w["dtype"]:
            checks.fail(f"like{w['path']}.dtype", w["dtype"], f"must be {s['dtype']} as saved")


def _target(like_leaf: Any, spec: dict[str, Any]) -> jax.ShapeDtypeStruct:
    """What orbax should restore for one leaf: stored shape and dtype, placed like `like_leaf` when it says."""
    sharding = getattr(like_leaf, "sharding", None)
    if sharding is None or "key_shape" in spec:  # keys are placed after wrapping (their data has extra axes)
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(tuple(spec["stored_shape"]), jnp.dtype(spec["stored_dtype"]), sharding=sharding)


# ---------------------------------------------------------------------------------------------------- API


def save_checkpoint(run_dir: Path, step: int, state: Any, meta: dict, keep: int = 2,
                    host_arrays: dict[str, np.ndarray] | None = None) -> Path:
    """Write `state` (a pytree of arrays) and `meta` as run_dir/ckpt_{step:08d}, atomically; keep the newest
    `keep` complete checkpoints. Saving a step that exists replaces it; a step older than the newest
    checkpoint is refused (that run_dir belongs to a later point of training). host_arrays: numpy arrays by
    name (letters, digits, _ . -), stored as .npy files in the same atomic checkpoint."""
    run_dir = Path(run_dir).absolute()  # orbax refuses relative paths
    checks.int_at_least("step", step, 0)
    checks.positive_int("keep", keep)
    meta_text = _meta_json(meta)
    leaves, specs, _ = _flatten(state, "state")
    for leaf, spec in zip(leaves, specs, strict=True):
        data = jax.random.key_data(leaf) if _is_key(leaf) else leaf
        spec.update(stored_shape=list(data.shape), stored_dtype=str(data.dtype))
        if _is_key(leaf):
            spec.update(key_shape=list(data.shape[leaf.ndim :]), key_impl=str(jax.random.key_impl(leaf)))

    run_dir.mkdir(parents=True, exist_ok=True)
    newest = latest_checkpoint(run_dir)
    if newest is not None and step < newest:
        checks.fail("step", step, f"must be >= {newest}, the newest checkpoint in {run_dir}")
    _clean_leftovers(run_dir)

    final = _ckpt_path(run_dir, step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step:08d}_", dir=run_dir))
    try:
        _write_arrays(tmp / _ARRAYS, leaves)
        if host_arrays:
            (tmp / _HOST).mkdir()
            for name, array in host_arrays.items():
                if not _HOST_NAME.match(name):
                    checks.fail("host_arrays", name, "names may hold letters, digits, '_', '.' and '-' only")
                np.save(tmp / _HOST / f"{name}.npy", np.asarray(array), allow_pickle=False)
        _write_json(tmp / "manifest.json", {"format": FORMAT, "step": step, "leaves": specs})
        (tmp / "meta.json").write_text(meta_text)
        _fsync_tree(tmp)
        _write_json(tmp / MARKER, {"step": step, "files": _file_records(tmp)})
        _fsync(tmp)
        if final.exists():
            # Same step saved again (or a stray incomplete dir): between these two renames the step is absent,
            # and a crash there falls back to the previous checkpoint.
            _remove(final)
        os.rename(tmp, final)
        _fsync(run_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, OSError) and "No space left on device" in str(err):  # tensorstore's own error type
            raise OSError(errno.ENOSPC, "No space left on device", str(run_dir)) from err
        raise

    for old in _complete_steps(run_dir)[:-keep]:
        _remove(_ckpt_path(run_dir, old))
    return final


def latest_checkpoint(run_dir: Path) -> int | None:
    """Step of the newest complete checkpoint in run_dir (temporaries and dirs without a marker ignored; its files
    are not verified here: see checkpoint_problems)."""
    steps = _complete_steps(Path(run_dir))
    return steps[-1] if steps else None


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in run_dir, ascending (files not verified)."""
    return _complete_steps(Path(run_dir))


def checkpoint_problems(run_dir: Path, step: int) -> list[str]:
    """What differs between checkpoint `step`'s files and what was written, one phrase per file (empty: intact,
    or written before markers recorded files, which only loading can tell)."""
    path = _ckpt_path(Path(run_dir), step)
    try:
        marker = json.loads((path / MARKER).read_text())
        files = marker.get("files") if isinstance(marker, dict) else None
        records = [(name, int(size), int(crc)) for name, (size, crc) in (files or {}).items()]
    except (OSError, ValueError, TypeError, AttributeError) as err:
        return [f"{MARKER}: unreadable ({checks.one_line(err)})"]
    problems = []
    for name, size, crc in records:
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != size:
            problems.append(f"{name}: {file.stat().st_size:,} bytes, {size:,} written")
        elif _crc32(file) != crc:
            problems.append(f"{name}: contents changed since written (CRC-32)")
    return problems


def _damaged(path: Path, problems: list[str]) -> DamagedCheckpoint:
    more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
    return DamagedCheckpoint(f"{path}: damaged: {'; '.join(problems[:2])}{more}")


def set_aside(run_dir: Path, step: int) -> Path:
    """Rename damaged checkpoint `step` to damaged_ckpt_* (kept to look at, never loaded again, no longer in the
    way of the checkpoints a resumed run writes); returns its new path."""
    path = _ckpt_path(Path(run_dir), step)
    aside = path.with_name(_DAMAGED_PREFIX + path.name)
    if aside.exists():
        _remove(aside)
    os.rename(path, aside)
    _fsync(Path(run_dir))
    return aside


def load_host_arrays(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """The host arrays saved with checkpoint `step` (empty when it has none), memory-mapped read-only."""
    path = _ckpt_path(Path(run_dir), step)
    if not (path / MARKER).is_file():
        checks.fail("step", step, f"no complete checkpoint in {run_dir}")
    if not (path / _HOST).is_dir():
        return {}
    try:
        return {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in sorted((path / _HOST).glob("*.npy"))}
    except (OSError, ValueError) as err:  # only checkpoints older than the marker's file records get here
        raise _damaged(path, [checks.one_line(err)]) from None


def load_checkpoint(run_dir: Path, step: int, like: Any) -> tuple[Any, dict]:
    """Load checkpoint `step` into the structure of `like` and return (state, meta).

    `like` gives the pytree structure, shapes and dtypes (a fresh state, or jax.eval_shape of one); leaves
    are placed with like's shardings where it has them, else on the first local device. A structure, shape
    or dtype that differs from what was saved raises ValueError; files that differ from what was written (or, in
    checkpoints older than the marker's file records, that fail to load) raise DamagedCheckpoint.
    """
    run_dir = Path(run_dir).absolute()  # orbax refuses relative paths
    checks.int_at_least("step", step, 0)
    path = _ckpt_path(run_dir, step)
    if not (path / MARKER).is_file():
        checks.fail("step", step, f"no complete checkpoint in {run_dir} (complete: {_complete_steps(run_dir)})")
    problems = checkpoint_problems(run_dir, step)
    if problems:
        raise _damaged(path, problems)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise _damaged(path, [checks.one_line(err)]) from None
    if manifest.get("format") != FORMAT:
        checks.fail("format", manifest.get("format"), f"{path} must be a {FORMAT} checkpoint")
    stored = manifest["leaves"]
    like_leaves, wanted, treedef = _flatten(like, "like")
    _check_like(stored, wanted)

    targets = {f"leaf_{i:06d}": _target(x, s) for i, (x, s) in enumerate(zip(like_leaves, stored, strict=True))}
    arrays = {}
    if targets:
        checkpointer = ocp.StandardCheckpointer()
        with _orbax_quiet():
            try:
                arrays = checkpointer.restore(path / _ARRAYS, targets)
            except Exception as err:  # only checkpoints older than the marker's file records get here damaged
                raise _damaged(path, [f"arrays: {checks.one_line(err)}"]) from None
            finally:
                checkpointer.close()

    leaves = []
    for i, (like_leaf, spec) in enumerate(zip(like_leaves, stored, strict=True)):
        leaf = arrays[f"leaf_{i:06d}"]
        if "key_impl" in spec:
            leaf = jax.random.wrap_key_data(leaf, impl=spec["key_impl"])
            if getattr(like_leaf, "sharding", None) is not None:
                leaf = jax.device_put(leaf, like_leaf.sharding)
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves), meta
