"""Host replay for the Atari trainer: every frame stored once (uint8 84x84 for Atari), stacks rebuilt at sampling.

Axes: E environments (one stream each), L = capacity / E records per stream, B batch, K frames per stack
(4 for Atari, 1 for unstacked observations), n the n-step horizon, F... one frame's shape.

Each environment call appends one record per stream, written when the call returns:

    frame     the newest frame of the observation the action was taken from
    action    the action taken (ignored by the env on a reset call)
    reward    raw reward (clipped to [-1, 1] only when a batch is built, if reward_clip)
    terminated, truncated   the game ended / the step cap cut it
    life_lost the call lost a life (a learning terminal when life_loss_terminal; the game goes on)
    first     the frame is the first of an episode: frames before it are zeros in its stacks (as ale-py's own)
    final     the frame is the last of an episode (reached by the call before), or its successor was never
              seen (a run resumed from a checkpoint): no transition starts here

The stack of record j is frames j-K+1 .. j of its stream, zeros before the episode's first frame. A transition
starts at record i when i is not final, record i+1 exists and the oldest frames of i's stack were not
overwritten. Its n-step return (Sutton 1988; Hessel et al. 2018) takes m <= n steps, stopping after a step
that ended the episode or lost a life when that is terminal, and before a step without a successor:

    reward   = sum_{k<m} gamma^k r_{i+k}
    discount = gamma^m (1 - terminal_{i+m-1})
    next_obs = stack(i + m)

Prioritized sampling (Schaul et al. 2016) uses a sum tree over all E*L slots; a slot's mass is p^alpha while a
transition starts there and 0 otherwise, so only valid starts are drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moescale import checks

FIELDS = ("frames", "action", "reward", "terminated", "truncated", "life_lost", "first", "final")


class SumTree:
    """Sums over leaves in a flat binary tree (numpy): set and stratified proportional sampling of B at once."""

    def __init__(self, size: int):
        checks.positive_int("size", size)
        self.size = size
        self.leaves = 1 << max(0, (size - 1).bit_length())
        self.tree = np.zeros(2 * self.leaves, np.float64)  # node k has children 2k, 2k+1; leaves at [leaves, 2L)

    @property
    def total(self) -> float:
        """Sum of all leaves."""
        return float(self.tree[1])

    def get(self, idx: np.ndarray) -> np.ndarray:
        """Leaf values at idx."""
        return self.tree[self.leaves + np.asarray(idx)]

    def set(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Set leaves idx to values (the last of duplicate indices wins) and refresh their ancestors."""
        idx = np.asarray(idx, np.int64).ravel()
        if idx.size == 0:
            return
        self.tree[self.leaves + idx] = np.broadcast_to(np.asarray(values, np.float64), idx.shape)
        nodes = np.unique((self.leaves + idx) >> 1)
        while nodes[0] >= 1:
            self.tree[nodes] = self.tree[2 * nodes] + self.tree[2 * nodes + 1]
            if nodes[0] == 1:
                break
            nodes = np.unique(nodes >> 1)

    def sample(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """B leaf indices drawn with probability leaf / total, one from each of B equal strata of the mass."""
        targets = (np.arange(batch) + rng.random(batch)) * (self.total / batch)
        node = np.ones(batch, np.int64)
        while node[0] < self.leaves:
            left = self.tree[2 * node]
            right = targets >= left
            targets = np.where(right, targets - left, targets)
            node = 2 * node + right
        return node - self.leaves


class FrameReplay:
    """One seed's replay of E parallel streams; see the module docstring for the record layout."""

    def __init__(self, capacity: int, num_envs: int, frame_shape: tuple[int, ...], frame_dtype: Any, stack: int,
                 n_step: int, gamma: float, reward_clip: bool, life_loss_terminal: bool, prioritized: bool = False,
                 alpha: float = 0.5, seed: int = 0):
        checks.positive_int("replay_capacity", capacity)
        checks.positive_int("num_envs", num_envs)
        checks.positive_int("stack", stack)
        checks.positive_int("n_step", n_step)
        if capacity % num_envs:
            checks.fail("replay_capacity", capacity, f"must be a multiple of num_envs={num_envs} (one stream each)")
        self.length = capacity // num_envs  # L
        if self.length < stack + n_step + 1:
            checks.fail("replay_capacity", capacity, f"must hold >= {stack + n_step + 1} records per environment")
        self.num_envs, self.stack, self.n_step, self.gamma = num_envs, stack, n_step, float(gamma)
        self.reward_clip, self.life_loss_terminal = reward_clip, life_loss_terminal
        shape = (num_envs, self.length)
        self.frames = np.zeros(shape + tuple(frame_shape), frame_dtype)
        self.action = np.zeros(shape, np.int32)
        self.reward = np.zeros(shape, np.float32)
        flags = ("terminated", "truncated", "life_lost", "first", "final")
        for name in flags:
            setattr(self, name, np.zeros(shape, np.bool_))
        self.cursor = 0  # the position the next record goes to, the same in every stream
        self.count = 0  # records written per stream, ever
        self.prioritized, self.alpha = prioritized, float(alpha)
        self.tree = SumTree(num_envs * self.length) if prioritized else None
        self.max_priority = 1.0
        self.rng = np.random.default_rng(seed)

    # ---------------------------------------------------------------------------------------------- writing

    @property
    def size(self) -> int:
        """Records held per stream."""
        return min(self.count, self.length)

    def nbytes(self) -> int:
        """Bytes held by the records (and the sum tree)."""
        arrays = [getattr(self, f) for f in FIELDS] + ([self.tree.tree] if self.tree is not None else [])
        return int(sum(a.nbytes for a in arrays))

    def add(self, frame: np.ndarray, action: np.ndarray, reward: np.ndarray, terminated: np.ndarray,
            truncated: np.ndarray, life_lost: np.ndarray, first: np.ndarray, final: np.ndarray) -> None:
        """Append one record to every stream: arrays (E, ...) / (E,)."""
        p = self.cursor
        self.frames[:, p] = frame
        for name, value in (("action", action), ("reward", reward), ("terminated", terminated),
                            ("truncated", truncated), ("life_lost", life_lost), ("first", first), ("final", final)):
            getattr(self, name)[:, p] = value
        self.count += 1
        self.cursor = (p + 1) % self.length
        if self.tree is not None:
            envs = np.arange(self.num_envs)
            # The new record has no successor yet; once the streams wrap, the K-1 oldest lost the start of
            # their stacks (before that, the slots after p hold nothing).
            lost = [(p + k) % self.length for k in range(self.stack if self.count > self.length else 1)]
            self.tree.set((envs[:, None] * self.length + np.array(lost)[None, :]).ravel(), 0.0)
            if self.count >= 2:  # record p-1 now has its successor: a transition unless it is final
                prev = (p - 1) % self.length
                starts = ~self.final[:, prev] & (self._age(prev) >= self._oldest_start())
                self.tree.set(envs * self.length + prev, np.where(starts, self.max_priority ** self.alpha, 0.0))

    def cut(self) -> None:
        """Mark every stream's newest record final: its successor will never be written (resume from a
        checkpoint restarts the environments), so no transition may start at or run through it."""
        if self.count == 0:
            return
        newest = (self.cursor - 1) % self.length
        self.final[:, newest] = True
        if self.tree is not None:
            self.tree.set(np.arange(self.num_envs) * self.length + newest, 0.0)

    # --------------------------------------------------------------------------------------------- sampling

    def _age(self, pos: np.ndarray | int) -> np.ndarray:
        """Writing order of position pos within a stream: 0 for the oldest record held."""
        oldest = (self.cursor - self.size) % self.length
        return (np.asarray(pos) - oldest) % self.length

    def _oldest_start(self) -> int:
        # Before the streams wrap, the oldest record is an episode's first frame, so its stack is complete.
        return self.stack - 1 if self.count > self.length else 0

    def num_starts(self) -> int:
        """Transitions that can be sampled now (summed over streams)."""
        lo, hi = self._oldest_start(), self.size - 2
        if hi < lo:
            return 0
        pos = (self.cursor - self.size + np.arange(lo, hi + 1)) % self.length
        return int(np.sum(~self.final[:, pos]))

    def ready(self) -> bool:
        """Whether a transition can be sampled (every stream holds one once two records are written)."""
        return self.size - 2 >= self._oldest_start()

    def _valid(self, env: np.ndarray, pos: np.ndarray) -> np.ndarray:
        age = self._age(pos)
        return (age >= self._oldest_start()) & (age <= self.size - 2) & ~self.final[env, pos]

    def sample_indices(self, batch: int, rng: np.random.Generator | None = None,
                       uniform: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(env (B,), pos (B,), mass (B,)) of B transition starts: uniform (mass 1), or in proportion to the
        mass priority^alpha when prioritized and not `uniform`. Draws from `rng` (default: the replay's own).
        ValueError when nothing can be sampled yet."""
        rng = self.rng if rng is None else rng
        prioritized = self.tree is not None and not uniform
        if not self.ready() or (prioritized and self.tree.total <= 0):
            checks.fail("replay", self.count, "holds no complete transition yet: take more steps before sampling")
        if prioritized:
            env, pos = np.divmod(self.tree.sample(rng, batch), self.length)
            bad = self.tree.get(env * self.length + pos) <= 0  # a stratum boundary can land on an empty leaf
            while bad.any():
                env[bad], pos[bad] = np.divmod(self.tree.sample(rng, int(bad.sum())), self.length)
                bad = self.tree.get(env * self.length + pos) <= 0
            return env, pos, self.tree.get(env * self.length + pos)
        env = np.empty(batch, np.int64)
        pos = np.empty(batch, np.int64)
        todo = np.arange(batch)
        lo, hi = self._oldest_start(), self.size - 2
        for _ in range(1000):  # a start is final once an episode at most: rejections are rare
            if not todo.size:
                return env, pos, np.ones(batch)
            env[todo] = rng.integers(0, self.num_envs, todo.size)
            pos[todo] = (self.cursor - self.size + rng.integers(lo, hi + 1, todo.size)) % self.length
            todo = todo[~self._valid(env[todo], pos[todo])]
        checks.fail("replay", self.count, "found no transition start in 1000 rounds of sampling")

    def stacks(self, env: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Observation stacks (B, K, *F) of records (env, pos): frames pos-K+1..pos, zeros before an episode's
        first frame."""
        back = np.arange(self.stack - 1, -1, -1)  # (K,) K-1 .. 0 frames back
        cols = (pos[:, None] - back[None, :]) % self.length  # (B, K) oldest first
        out = self.frames[env[:, None], cols]
        # Frame j-k is kept only if none of j, j-1, ..., j-k+1 starts an episode.
        first = self.first[env[:, None], cols]  # (B, K)
        starts_after = np.cumsum(first[:, ::-1], axis=1)[:, ::-1] - first  # (B, K): firsts strictly later
        keep = starts_after == 0
        return np.where(keep.reshape(keep.shape + (1,) * (out.ndim - 2)), out, 0).astype(out.dtype)

    def batch(self, env: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
        """The n-step learning batch of transitions starting at (env, pos): obs, action, reward, discount,
        next_obs (module docstring)."""
        n = self.n_step
        cols = (pos[:, None] + np.arange(n)[None, :]) % self.length  # (B, n)
        rows = env[:, None]
        has_next = self._age(pos)[:, None] + np.arange(n)[None, :] <= self.size - 2
        live = has_next & ~self.final[rows, cols]
        terminal = self.terminated[rows, cols]
        if self.life_loss_terminal:
            terminal = terminal | self.life_lost[rows, cols]
        ended = terminal | self.truncated[rows, cols]
        ended_before = (np.cumsum(ended, axis=1) - ended) > 0
        taken = live & ~ended_before & (np.cumsum(~live, axis=1) == 0)
        steps = np.maximum(taken.sum(axis=1), 1)  # m
        reward = self.reward[rows, cols]
        if self.reward_clip:
            reward = np.clip(reward, -1.0, 1.0)
        powers = self.gamma ** np.arange(n)
        ret = np.sum(np.where(taken, reward * powers, 0.0), axis=1)
        last_terminal = terminal[np.arange(len(pos)), steps - 1]
        discount = self.gamma ** steps * (1.0 - last_terminal)
        return {"obs": self.stacks(env, pos), "action": self.action[env, pos], "reward": ret.astype(np.float32),
                "discount": discount.astype(np.float32), "next_obs": self.stacks(env, (pos + steps) % self.length)}

    def sample(self, batch: int, beta: float = 0.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """A learning batch of B transitions with importance weights, and the flat slots to pass to
        update_priorities. Weights (Schaul et al. 2016, section 3.4): (N P(i))^-beta / max over the batch, which
        is (p_i / p_min)^(-alpha beta) with p_min the batch's smallest priority (N and the total cancel); all
        ones for uniform sampling."""
        env, pos, mass = self.sample_indices(batch)
        out = self.batch(env, pos)
        log_w = -beta * np.log(mass)
        out["weights"] = np.exp(log_w - log_w.max()).astype(np.float32)
        return out, env * self.length + pos

    def update_priorities(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Set sampled slots' priorities (e.g. |TD error| + floor); slots no longer starting a transition (final,
        overwritten or lost their stack since sampling) stay at 0."""
        priorities = np.asarray(priorities, np.float64)
        self.max_priority = max(self.max_priority, float(priorities.max(initial=0.0)))
        env, pos = np.divmod(np.asarray(slots), self.length)
        mass = np.where(self._valid(env, pos), priorities ** self.alpha, 0.0)
        self.tree.set(slots, mass)

    # ------------------------------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, np.ndarray]:
        """Every array and counter, for a checkpoint."""
        out = {name: getattr(self, name) for name in FIELDS}
        out["counters"] = np.array([self.cursor, self.count], np.int64)
        out["max_priority"] = np.array(self.max_priority, np.float64)
        if self.tree is not None:
            out["tree"] = self.tree.tree
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state() returned (shapes and dtypes must match this replay's)."""
        for name, value in state.items():
            if name == "counters":
                self.cursor, self.count = (int(v) for v in value)
            elif name == "max_priority":
                self.max_priority = float(value)
            elif name == "tree":
                self.tree.tree[...] = value
            else:
                getattr(self, name)[...] = value
