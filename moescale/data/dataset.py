"""On-disk offline-RL datasets: a directory of .npz chunks plus a dataset.json manifest, written incrementally.

Axes: T transitions in one chunk (or in a loaded dataset), `obs_shape` one observation's shape (e.g. (10, 10, C)
for MinAtar, (F,) for classic control), E = num_envs, the stride of the interleaved vectorised environments.

Format "moescale-offline-rl", version 1. A dataset is a directory:

    <path>/dataset.json                       the manifest (below); the only file a reader trusts
    <path>/chunks/seed_<s>/chunk_<k>.npz      chunk k (6 digits, from 000000) of recorded seed s, one per append()

Every chunk is an .npz (numpy zip; compressed by default, allow_pickle never needed) holding exactly:

    obs         (T, *obs_shape)  obs_dtype  observation acted on
    action      (T,)             int32      action taken, in [0, num_actions)
    reward      (T,)             float32    reward received
    terminated  (T,)             bool       the episode ended in a terminal state (no bootstrap)
    next_obs    (T, *obs_shape)  obs_dtype  observation reached (the true final one on truncation)
    truncated   (T,)             bool       a time limit cut the episode here (bootstrap from next_obs)

These are the fields of moescale.replay.uniform.Transition. Within one seed, chunks concatenated in order k = 0, 1,
... are that seed's transitions in writing (time) order, with the E environments interleaved: entry i and entry
i + E are consecutive steps of the same environment. Every chunk holds a whole number of steps (T a multiple of E),
so the stride also holds across chunk boundaries.

dataset.json keys:

    format           "moescale-offline-rl"
    version          1
    complete         false while recording; true once DatasetWriter.close() ran (readers refuse false)
    env_name         environment name, e.g. "Breakout-MinAtar"
    protocol         JaxEnv.protocol() of the recording environment (any JSON-able dict)
    obs_shape        list of ints
    obs_dtype        numpy dtype name, e.g. "bool", "float32"
    num_actions      int
    num_envs         int E, the stride of the interleaving (n-step returns follow env j at j, j + E, j + 2E, ...)
    source           JSON-able dict describing how the data was produced (agent, config, checkpoint, ...)
    seeds            {"<s>": {"num_transitions": int, "chunks": [chunk, ...]}} per recorded seed s, chunks in order
                     chunk = {"file": "chunks/seed_<s>/chunk_<k>.npz", "num_transitions": T, "num_bytes": int,
                              "sha256": hex digest of the file}
    num_transitions  total over all seeds

Atomicity: a chunk is written to a hidden temp file in its folder, fsynced and renamed into place; only then is the
manifest (also temp file + fsync + rename) updated to list it. A crash therefore leaves at worst a temp file or an
unlisted chunk, which readers never open; a listed chunk whose size or sha256 no longer matches is reported as
corrupt. A dataset whose writer never reached close() stays "complete": false and is refused by load_dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from moescale import checks
from moescale.replay.uniform import Transition

FORMAT_NAME = "moescale-offline-rl"
FORMAT_VERSION = 1
MANIFEST = "dataset.json"
CHUNKS_DIR = "chunks"
FIELDS: tuple[str, ...] = ("obs", "action", "reward", "terminated", "next_obs", "truncated")
MODES: tuple[str, ...] = ("first", "last", "uniform")
_MANIFEST_KEYS = (
    "format", "version", "complete", "env_name", "protocol", "obs_shape", "obs_dtype", "num_actions", "num_envs",
    "source", "seeds", "num_transitions",
)  # fmt: skip


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(target: Path, write: Any) -> None:
    """Write `target` via a temp file in the same folder: write(fileobj), flush, fsync, rename, fsync the folder."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_able(field: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        checks.fail(field, type(value).__name__, f"must be JSON-able ({e})")


class DatasetWriter:
    """Records transitions into a new dataset directory, one atomically written chunk per append().

    Usage: `w = DatasetWriter(...); w.append(seed, arrays) ...; w.close()` (or `with DatasetWriter(...) as w:`,
    which closes only when the block raised nothing, so an interrupted recording stays incomplete).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        env_name: str,
        protocol: dict[str, Any],
        obs_shape: tuple[int, ...],
        obs_dtype: Any,
        num_actions: int,
        num_envs: int,
        source: dict[str, Any],
        compress: bool = True,
    ) -> None:
        """Create the dataset at `path` (a new or empty directory) and write its manifest with complete=false.

        obs_shape: one observation's shape `...`; obs_dtype: its numpy dtype (kept exactly, e.g. bool);
        num_envs: E, the interleaving stride of every appended array; source: JSON-able provenance.
        """
        self.path = Path(path)
        if not isinstance(env_name, str) or not env_name:
            checks.fail("env_name", env_name, "must be a non-empty string")
        if not isinstance(protocol, dict):
            checks.fail("protocol", protocol, "must be a dict (JaxEnv.protocol())")
        _json_able("protocol", protocol)
        if not isinstance(source, dict):
            checks.fail("source", source, "must be a dict")
        _json_able("source", source)
        if not isinstance(obs_shape, tuple | list) or not all(checks.is_int(d) and d >= 1 for d in obs_shape):
            checks.fail("obs_shape", obs_shape, "must be a tuple of positive ints")
        try:
            dtype = np.dtype(obs_dtype)
        except TypeError:
            checks.fail("obs_dtype", obs_dtype, "must be a numpy dtype")
        if dtype.kind not in "biuf":
            checks.fail("obs_dtype", obs_dtype, "must be a bool, integer or float dtype")
        checks.positive_int("num_actions", num_actions)
        checks.positive_int("num_envs", num_envs)
        # When the protocol states the same facts, they must agree (catches a protocol from another env).
        for key, mine in (("env", env_name), ("obs_shape", list(obs_shape)), ("obs_dtype", dtype.name),
                          ("num_actions", int(num_actions))):  # fmt: skip
            if key in protocol and protocol[key] != mine:
                checks.fail(f"protocol[{key!r}]", protocol[key], f"must match the writer's {mine!r}")
        if self.path.exists():
            if not self.path.is_dir():
                checks.fail("path", str(self.path), "exists and is not a directory; give a new or empty directory")
            if any(self.path.iterdir()):
                checks.fail("path", str(self.path), "exists and is not empty; refusing to overwrite, pick a new path")
        self.path.mkdir(parents=True, exist_ok=True)
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.obs_dtype = dtype
        self.num_actions = int(num_actions)
        self.num_envs = int(num_envs)
        self.compress = bool(compress)
        self.closed = False
        self.manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "complete": False,
            "env_name": env_name,
            "protocol": protocol,
            "obs_shape": list(self.obs_shape),
            "obs_dtype": dtype.name,
            "num_actions": self.num_actions,
            "num_envs": self.num_envs,
            "source": source,
            "seeds": {},
            "num_transitions": 0,
        }
        self._write_manifest()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and not self.closed:
            self.close()

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1, allow_nan=False).encode()
        _atomic_write(self.path / MANIFEST, lambda f: f.write(text))

    def _check(self, transitions: Any) -> dict[str, np.ndarray]:
        """Validate one chunk's arrays (each (T, ...)) and return them in their stored dtypes."""
        if isinstance(transitions, Transition):
            transitions = {name: getattr(transitions, name) for name in FIELDS}
        if not isinstance(transitions, dict):
            checks.fail("transitions", type(transitions).__name__, f"must be a dict with keys {list(FIELDS)}")
        if set(transitions) != set(FIELDS):
            checks.fail("transitions", sorted(transitions), f"keys must be exactly {list(FIELDS)}")
        arrays = {name: np.asarray(transitions[name]) for name in FIELDS}
        t = arrays["obs"].shape[0] if arrays["obs"].ndim else 0
        if t == 0 or t % self.num_envs:
            checks.fail(
                "transitions['obs'].shape",
                arrays["obs"].shape,
                f"leading axis T must be a positive multiple of num_envs={self.num_envs} (whole steps)",
            )
        for name in ("obs", "next_obs"):
            a = arrays[name]
            if a.shape != (t, *self.obs_shape):
                checks.fail(f"transitions[{name!r}].shape", a.shape, f"must be {(t, *self.obs_shape)}")
            if a.dtype != self.obs_dtype:
                checks.fail(f"transitions[{name!r}].dtype", a.dtype.name, f"must be {self.obs_dtype.name}")
        for name in ("action", "reward", "terminated", "truncated"):
            if arrays[name].shape != (t,):
                checks.fail(f"transitions[{name!r}].shape", arrays[name].shape, f"must be {(t,)}")
        action = arrays["action"]
        if action.dtype.kind not in "iu":
            checks.fail("transitions['action'].dtype", action.dtype.name, "must be an integer dtype")
        if action.min() < 0 or action.max() >= self.num_actions:
            checks.fail(
                "transitions['action']",
                (int(action.min()), int(action.max())),
                f"(min, max) must lie in [0, {self.num_actions})",
            )
        if arrays["reward"].dtype.kind not in "iuf":
            checks.fail("transitions['reward'].dtype", arrays["reward"].dtype.name, "must be a real dtype")
        for name in ("terminated", "truncated"):
            if arrays[name].dtype != np.bool_:
                checks.fail(f"transitions[{name!r}].dtype", arrays[name].dtype.name, "must be bool")
        arrays["action"] = action.astype(np.int32)
        arrays["reward"] = arrays["reward"].astype(np.float32)
        return arrays

    def append(self, seed: int, transitions: dict[str, np.ndarray] | Transition) -> str:
        """Write one chunk of recorded seed `seed` and list it in the manifest; return its relative file name.

        transitions: the FIELDS as arrays with leading axis T (a positive multiple of num_envs), in writing order:
        entry i and i + num_envs are consecutive steps of one environment. obs/next_obs (T, *obs_shape) obs_dtype,
        action (T,) integer in [0, num_actions) (stored int32), reward (T,) real (stored float32), terminated and
        truncated (T,) bool. Chunks of one seed concatenate in append order.
        """
        if self.closed:
            checks.fail("append", str(self.path), "dataset is closed; no more chunks can be added")
        checks.int_at_least("seed", seed, 0)
        arrays = self._check(transitions)
        entry = self.manifest["seeds"].setdefault(str(int(seed)), {"num_transitions": 0, "chunks": []})
        rel = f"{CHUNKS_DIR}/seed_{int(seed)}/chunk_{len(entry['chunks']):06d}.npz"
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        save = np.savez_compressed if self.compress else np.savez
        _atomic_write(target, lambda f: save(f, **arrays))
        t = int(arrays["obs"].shape[0])
        entry["chunks"].append(
            {"file": rel, "num_transitions": t, "num_bytes": target.stat().st_size, "sha256": _sha256(target)}
        )
        entry["num_transitions"] += t
        self.manifest["num_transitions"] += t
        self._write_manifest()
        return rel

    @classmethod
    def reopen(cls, path: str | os.PathLike, chunks_per_seed: int) -> DatasetWriter:
        """Continue an interrupted recording at `path`: keep the first chunks_per_seed chunks of every seed (those
        a resumed run's checkpoint covers), delete any later ones, and append after them.

        ValueError if the dataset is complete, unreadable, or holds fewer chunks than asked for."""
        path = Path(path)
        manifest = _read_manifest(path, complete=False)
        checks.int_at_least("chunks_per_seed", chunks_per_seed, 0)
        for seed, entry in manifest["seeds"].items():
            if len(entry["chunks"]) < chunks_per_seed:
                checks.fail("path", str(path), f"seed {seed} holds {len(entry['chunks'])} chunks, fewer than the "
                            f"{chunks_per_seed} the checkpoint covers")
            for dropped in entry["chunks"][chunks_per_seed:]:
                (path / dropped["file"]).unlink(missing_ok=True)
            entry["chunks"] = entry["chunks"][:chunks_per_seed]
            entry["num_transitions"] = sum(c["num_transitions"] for c in entry["chunks"])
        manifest["num_transitions"] = sum(e["num_transitions"] for e in manifest["seeds"].values())
        writer = cls.__new__(cls)
        writer.path, writer.manifest, writer.closed, writer.compress = path, manifest, False, True
        writer.obs_shape = tuple(manifest["obs_shape"])
        writer.obs_dtype = np.dtype(manifest["obs_dtype"])
        writer.num_actions, writer.num_envs = int(manifest["num_actions"]), int(manifest["num_envs"])
        writer._write_manifest()
        return writer

    def close(self) -> None:
        """Mark the dataset complete (readers refuse it before this); later appends are refused."""
        if not self.closed:
            self.manifest["complete"] = True
            self._write_manifest()
            self.closed = True


def _read_manifest(path: Path, complete: bool = True) -> dict[str, Any]:
    """Load and check dataset.json (complete: that its writer closed it; False: that it did not); every problem
    is one ValueError naming the path."""
    if not path.exists():
        checks.fail("path", str(path), "does not exist")
    if not path.is_dir():
        checks.fail("path", str(path), f"is not a dataset: not a directory holding {MANIFEST}")
    mpath = path / MANIFEST
    if not mpath.is_file():
        checks.fail("path", str(path), f"is not a dataset: no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        checks.fail("path", str(path), f"is not a dataset: {MANIFEST} is unreadable ({e})")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        checks.fail("path", str(path), f"is not a dataset: {MANIFEST} lacks format={FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        checks.fail(
            "path",
            str(path),
            f"dataset version {manifest.get('version')!r} unsupported; this reader knows version {FORMAT_VERSION}",
        )
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        checks.fail("path", str(path), f"is not a dataset: {MANIFEST} lacks keys {missing}")
    if complete and manifest["complete"] is not True:
        checks.fail(
            "path", str(path), "dataset is incomplete: its writer never called close() (crashed or still recording)"
        )
    if not complete and manifest["complete"] is not False:
        checks.fail("path", str(path), "is a complete dataset; only an interrupted recording can be continued")
    return manifest


def _load_chunk(path: Path, chunk: dict[str, Any], manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """Read one listed chunk, checking size, checksum and every array's shape and dtype against the manifest."""
    file = path / chunk["file"]
    where = f"{path}/{chunk['file']}"
    if not file.is_file():
        checks.fail("chunk", where, "is missing")
    size = file.stat().st_size
    if size != chunk["num_bytes"]:
        checks.fail("chunk", where, f"is truncated or corrupt: {size} bytes on disk, {chunk['num_bytes']} recorded")
    if _sha256(file) != chunk["sha256"]:
        checks.fail("chunk", where, "is corrupt: sha256 differs from the recorded one")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in FIELDS}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        checks.fail("chunk", where, f"is corrupt: cannot read it ({type(e).__name__}: {e})")
    t = chunk["num_transitions"]
    obs_spec = ((t, *manifest["obs_shape"]), np.dtype(manifest["obs_dtype"]))
    specs = {"obs": obs_spec, "next_obs": obs_spec, "action": ((t,), np.dtype(np.int32)),
             "reward": ((t,), np.dtype(np.float32)), "terminated": ((t,), np.dtype(np.bool_)),
             "truncated": ((t,), np.dtype(np.bool_))}  # fmt: skip
    for name, (shape, dtype) in specs.items():
        if arrays[name].shape != shape or arrays[name].dtype != dtype:
            checks.fail(
                "chunk",
                where,
                f"is corrupt: {name} is {arrays[name].shape} {arrays[name].dtype.name}, "
                f"the manifest says {shape} {dtype.name}",
            )
    return arrays


def load_dataset(
    path: str | os.PathLike,
    env_name: str | None = None,
    subset: float | None = None,
    mode: str = "first",
    seed: int = 0,
    rng_seed: int = 0,
) -> tuple[Transition, dict[str, Any]]:
    """Load one recorded seed's transitions, or a fraction of them, as a Transition of numpy arrays.

    path: a dataset directory written by DatasetWriter and closed. env_name: when given, the dataset must have
    been recorded on this environment. seed: which recorded seed's data to load (the `seed` passed to
    DatasetWriter.append; one seed's transitions form one time-ordered stream, so seeds are never mixed).
    subset: None (everything) or a fraction in (0, 1]; n = floor(subset * T) transitions are kept (at least 1).
    mode: "first" the first n in time order, "last" the last n, "uniform" n distinct ones drawn uniformly without
    replacement with numpy's default_rng(rng_seed), returned in time order.

    Returns (transitions, manifest): fields (n, ...) in the dtypes of the module docstring, and the manifest
    with an added key "loaded" = {"seed", "subset", "mode", "rng_seed", "num_transitions", "contiguous",
    "start"}. With "first"/"last" (or no subset) the rows are contiguous, so the stride still holds: row i and
    i + num_envs are consecutive steps of one environment, and row i belongs to environment (start + i) % num_envs.
    With "uniform" rows are not contiguous (contiguous=false, start=None) and the stride does not apply.
    """
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int | float)
                               or not 0 < subset <= 1):  # fmt: skip
        checks.fail("subset", subset, "must be None or a fraction in (0, 1], e.g. 0.1 for 10%")
    checks.choice("mode", mode, MODES)
    checks.int_at_least("seed", seed, 0)
    checks.int_at_least("rng_seed", rng_seed, 0)
    path = Path(path)
    manifest = _read_manifest(path)
    if env_name is not None and manifest["env_name"] != env_name:
        checks.fail("env_name", env_name, f"dataset {path} was recorded on {manifest['env_name']!r}")
    seeds = manifest["seeds"]
    if str(seed) not in seeds:
        checks.fail("seed", seed, f"not recorded in {path}; recorded seeds: {sorted(int(s) for s in seeds)}")
    chunks = seeds[str(seed)]["chunks"]
    total = sum(c["num_transitions"] for c in chunks)
    n = total if subset is None else max(1, math.floor(subset * total + 1e-9))
    if mode == "uniform" and subset is not None:
        rows = np.sort(np.random.default_rng(rng_seed).choice(total, size=n, replace=False))
        start = None
    else:
        start = total - n if mode == "last" and subset is not None else 0
        rows = np.arange(start, start + n)
    # Read only the chunks holding wanted rows; bounds[k] is chunk k's first row in the seed's stream.
    bounds = np.cumsum([0] + [c["num_transitions"] for c in chunks])
    parts: dict[str, list[np.ndarray]] = {name: [] for name in FIELDS}
    for k, chunk in enumerate(chunks):
        lo, hi = np.searchsorted(rows, [bounds[k], bounds[k + 1]])
        if lo == hi:
            continue
        arrays = _load_chunk(path, chunk, manifest)
        local = rows[lo:hi] - bounds[k]
        for name in FIELDS:
            parts[name].append(arrays[name][local])
    data = Transition(**{name: np.concatenate(parts[name]) for name in FIELDS})
    manifest = dict(manifest)
    manifest["loaded"] = {"seed": seed, "subset": subset, "mode": mode, "rng_seed": rng_seed,
                          "num_transitions": int(n), "contiguous": start is not None, "start": start}  # fmt: skip
    return data, manifest


def episode_returns(data: Transition, stride: int = 1, skip_first: bool = False) -> np.ndarray:
    """Returns of the episodes that end within contiguous, time-ordered rows (E = stride interleaved envs).

    Row i belongs to environment i % stride, and rows i, i + stride, ... are its consecutive steps. An episode
    counts when a row with terminated or truncated ends it; the steps after an environment's last ending are an
    unfinished episode and are left out. skip_first also leaves out each environment's first ending episode, for
    rows that start mid-episode (a "last" subset), whose earlier rewards are not in the data.
    """
    checks.positive_int("stride", stride)
    reward = np.asarray(data.reward, np.float64)
    ended = np.asarray(data.terminated) | np.asarray(data.truncated)
    returns = []
    for env in range(stride):
        r, e = reward[env::stride], ended[env::stride]
        ends = np.flatnonzero(e)
        sums = np.add.reduceat(r, np.concatenate([[0], ends[:-1] + 1])) if len(ends) else np.zeros(0)
        returns.append(sums[1:] if skip_first else sums)
    return np.concatenate(returns) if returns else np.zeros(0)
