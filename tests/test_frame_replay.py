"""Tests for moescale.replay.frames: the numpy sum tree against numpy sums and a brute-force inverse CDF, its
stratified draws and sampling frequencies; FrameReplay driven like the trainer (E streams of random episodes with
reset calls, life losses, truncations and rewards outside [-1, 1], wrapping several times) against a reference
computed with plain loops from every stream's full, never overwritten history (stacks, n-step returns, discounts,
next observations, which starts are accepted); prioritized masses, priority updates, importance weights and
frequencies; cut(); the state() round trip; argument errors; and the Atari memory figure.

Axes: E streams, L records per stream, K frames per stack, n the n-step horizon, B batch; g is a record's index in
its stream's history (it never wraps), pos = g % L its slot in the stream, slot = env * L + pos a flat slot.
"""

from __future__ import annotations

import collections
import dataclasses
import io

import numpy as np
import pytest

from moescale.replay.frames import FrameReplay, SumTree

FRAME = (2, 3)  # a frame's shape in the replay tests (uint8)
ALPHA = 0.5
REWARDS = (-2.5, -1.0, -0.5, 0.0, 0.0, 0.25, 1.0, 3.0)  # raw rewards, some outside [-1, 1]; exact in float32


# ------------------------------------------------------------------------------------------------------ SumTree


class FixedRng:
    """Stands in for np.random.Generator in SumTree.sample: random(B) returns the given B uniforms."""

    def __init__(self, u):
        self.u = np.asarray(u, np.float64)

    def random(self, n):
        assert n == len(self.u)
        return self.u


def inverse_cdf(leaves: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Brute force of stratified proportional sampling: draw i is the leaf whose interval of cumulative mass
    [c_{k-1}, c_k) holds the target (i + u_i) T / B."""
    targets = (np.arange(len(u)) + u) * (leaves.sum() / len(u))
    return np.searchsorted(np.cumsum(leaves), targets, side="right")


@pytest.mark.parametrize("size", [13, 1])
def test_sumtree_set_get_total_against_numpy(size):
    """Rounds of set() at random indices (duplicates included, the last one wins) keep every leaf and the total
    equal to a numpy reference array, and sample() lands each target on the leaf a brute-force inverse CDF
    picks. Leaf values are multiples of 1/4, so every sum is exact."""
    rng = np.random.default_rng(size)
    tree = SumTree(size)
    ref = np.zeros(size)
    duplicates = 0
    for _ in range(40):
        idx = rng.integers(0, size, rng.integers(1, size + 5))
        values = rng.integers(0, 12, len(idx)) * 0.25
        tree.set(idx, values)
        for i, v in zip(idx, values, strict=True):  # sequential writes: the last of duplicates wins
            ref[i] = v
        duplicates += len(idx) - len(np.unique(idx))
        np.testing.assert_array_equal(tree.get(np.arange(size)), ref)
        assert tree.total == ref.sum()
        if ref.sum() > 0:
            u = rng.random(7)
            np.testing.assert_array_equal(tree.sample(FixedRng(u), 7), inverse_cdf(ref, u))
    assert duplicates > 0


def test_sumtree_hand_cases():
    """Worked by hand: duplicates in one call (last wins), a scalar broadcast to several leaves, and size 1
    (the root is the only leaf, every draw is leaf 0)."""
    tree = SumTree(13)
    tree.set([2, 5, 2, 12], [1.0, 3.0, 7.0, 0.5])
    assert tree.get([2, 5, 12]).tolist() == [7.0, 3.0, 0.5]
    assert tree.total == 10.5
    tree.set([5, 5], [2.0, 0.0])
    assert tree.get([5]).tolist() == [0.0]
    assert tree.total == 7.5
    tree.set([0, 1, 12], 2.0)
    assert tree.get([0, 1, 2, 12]).tolist() == [2.0, 2.0, 7.0, 2.0]
    assert tree.total == 13.0
    tree.set([], [])  # nothing to set
    assert tree.total == 13.0
    # Targets exactly on a boundary of cumulative mass (u = 0: targets 0, 1, 2, 3 of T = 4) go to the next leaf
    # with mass, never to the empty leaves that end there.
    empty_edges = SumTree(13)
    empty_edges.set(np.arange(13), [0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0])
    assert empty_edges.sample(FixedRng(np.zeros(4)), 4).tolist() == [1, 3, 6, 8]
    one = SumTree(1)
    one.set([0], 2.5)
    assert one.total == 2.5
    assert one.get([0]).tolist() == [2.5]
    assert one.sample(np.random.default_rng(0), 5).tolist() == [0] * 5


def test_sumtree_frequencies_and_zero_mass():
    """200k draws (B = 50 per call) from 13 leaves: zero leaves and the padding leaves 13..15 are never drawn;
    every leaf's frequency is within 4 multinomial standard errors of leaf / total (stratification only makes
    the spread smaller)."""
    leaves = np.array([0, 3, 0, 1, 5, 0, 2, 0.5, 0, 4, 1.5, 0, 6])
    tree = SumTree(13)
    tree.set(np.arange(13), leaves)
    rng = np.random.default_rng(0)
    draws = np.concatenate([tree.sample(rng, 50) for _ in range(4000)])
    counts = np.bincount(draws, minlength=16)
    assert counts[13:].sum() == 0
    assert counts[:13][leaves == 0].sum() == 0
    p = leaves / leaves.sum()
    freq = counts[:13] / len(draws)
    se = np.sqrt(p * (1 - p) / len(draws))
    assert np.all(np.abs(freq - p) <= 4 * se), (freq, p)


def test_sumtree_stratified():
    """Draw i of a batch of B lies in stratum i: with 12 equal leaves and B dividing 12, draw i is one of leaves
    [i 12/B, (i+1) 12/B); with unequal leaves (13 of them), draw i's mass interval meets [i T/B, (i+1) T/B)."""
    rng = np.random.default_rng(1)
    tree = SumTree(12)
    tree.set(np.arange(12), 1.0)
    for batch in (2, 3, 4, 12):
        width = 12 // batch
        for _ in range(100):
            np.testing.assert_array_equal(tree.sample(rng, batch) // width, np.arange(batch))
    leaves = np.array([0.5, 0, 3, 1, 0.25, 2, 0, 4, 1, 1, 0.75, 2, 5])
    tree = SumTree(13)
    tree.set(np.arange(13), leaves)
    cum = np.concatenate([[0.0], np.cumsum(leaves)])
    lo_stratum = np.arange(5) * leaves.sum() / 5
    hi_stratum = lo_stratum + leaves.sum() / 5
    for _ in range(300):
        d = tree.sample(rng, 5)
        assert np.all((cum[d] < hi_stratum) & (cum[d + 1] > lo_stratum)), d


# -------------------------------------------------------------------------------- streams and the reference


@dataclasses.dataclass(frozen=True)
class Cfg:
    """A FrameReplay configuration for the tests (E streams of L records)."""

    stack: int = 4
    n_step: int = 3
    life_loss_terminal: bool = True
    reward_clip: bool = True
    num_envs: int = 3
    length: int = 12
    gamma: float = 0.9

    def replay(self, prioritized: bool = False, seed: int = 0) -> FrameReplay:
        return FrameReplay(self.num_envs * self.length, self.num_envs, FRAME, np.uint8, self.stack, self.n_step,
                           self.gamma, self.reward_clip, self.life_loss_terminal, prioritized=prioritized,
                           alpha=ALPHA, seed=seed)


def cfg_id(cfg: Cfg) -> str:
    return f"K{cfg.stack}-n{cfg.n_step}-lifeterm{int(cfg.life_loss_terminal)}-clip{int(cfg.reward_clip)}"


@dataclasses.dataclass
class Record:
    """One record of a stream, as passed to FrameReplay.add."""

    frame: np.ndarray
    action: int
    reward: float
    terminated: bool = False
    truncated: bool = False
    life_lost: bool = False
    first: bool = False
    final: bool = False


class Streams:
    """E environments driven like the trainer. Every call appends one record per stream; hist[e] is stream e's
    full history. A step that ends an episode (terminated or truncated) is followed by the reset call's record
    (the episode's final frame: final, reward 0, no flags), then by the new episode's first frame (first). Life
    losses happen on some steps and the episode goes on. Frame c (a global counter) holds c % 251 + 1 and
    c // 251 + 1: unique and never all zero."""

    def __init__(self, num_envs: int, seed: int, p_term: float = 0.1, p_trunc: float = 0.05, p_life: float = 0.15):
        self.rng = np.random.default_rng(seed)
        self.hist: list[list[Record]] = [[] for _ in range(num_envs)]
        self.next = ["first"] * num_envs  # the kind of stream e's next record: first, step or final
        self.p_term, self.p_trunc, self.p_life = p_term, p_trunc, p_life
        self.frames = 0

    def new_frame(self) -> np.ndarray:
        lo, hi = self.frames % 251 + 1, self.frames // 251 + 1
        self.frames += 1
        return np.array([[lo, hi, 7], [hi, lo, 9]], np.uint8)

    def step(self, *replays: FrameReplay) -> None:
        """One environment call: a record per stream, added to every replay given."""
        records = []
        for e, kind in enumerate(self.next):
            frame, action = self.new_frame(), int(self.rng.integers(6))
            if kind == "final":
                rec = Record(frame, action, 0.0, final=True)
                self.next[e] = "first"
            else:
                u = self.rng.random(3)
                rec = Record(frame, action, float(self.rng.choice(REWARDS)), bool(u[0] < self.p_term),
                             bool(u[1] < self.p_trunc), bool(u[2] < self.p_life), first=kind == "first")
                self.next[e] = "final" if rec.terminated or rec.truncated else "step"
            self.hist[e].append(rec)
            records.append(rec)
        arrays = [np.stack([r.frame for r in records])]
        for name in ("action", "reward", "terminated", "truncated", "life_lost", "first", "final"):
            arrays.append(np.array([getattr(r, name) for r in records]))
        for replay in replays:
            replay.add(*arrays)

    def cut(self, *replays: FrameReplay) -> None:
        """Resume-from-checkpoint: the newest records become final and every stream starts a new episode."""
        for e, hist in enumerate(self.hist):
            hist[-1].final = True
            self.next[e] = "first"
        for replay in replays:
            replay.cut()


def ref_stack(hist: list[Record], g: int, stack: int, oldest: int) -> np.ndarray | None:
    """Frames g-K+1 .. g of a stream (oldest first), zeros before the episode's first frame; None when a frame
    it needs is older than `oldest` (overwritten)."""
    frames, blocked = [], False
    for j in range(g, g - stack, -1):
        if blocked:
            frames.append(np.zeros(FRAME, np.uint8))
        elif j < oldest:
            return None
        else:
            frames.append(hist[j].frame)
            blocked = hist[j].first
    return np.stack(frames[::-1])


def ref_transition(hist: list[Record], g: int, count: int, cfg: Cfg) -> dict | None:
    """The transition starting at record g of a stream with `count` records written, by plain loops over the
    history; None when none may start there (not held, no successor, final, or its stack is overwritten)."""
    oldest = count - min(count, cfg.length)
    if not oldest <= g <= count - 2 or hist[g].final:
        return None
    obs = ref_stack(hist, g, cfg.stack, oldest)
    if obs is None:
        return None
    ret, m, terminal, steps = 0.0, 0, False, []
    for k in range(cfg.n_step):
        if g + k > count - 2 or hist[g + k].final:  # no successor yet, or the record is no step at all
            break
        rec = hist[g + k]
        r = min(max(rec.reward, -1.0), 1.0) if cfg.reward_clip else rec.reward
        ret += cfg.gamma**k * r
        m = k + 1
        steps.append(rec)
        terminal = rec.terminated or (cfg.life_loss_terminal and rec.life_lost)
        if terminal or rec.truncated:
            break
    return {"obs": obs, "action": hist[g].action, "reward": ret, "discount": cfg.gamma**m * (0.0 if terminal else 1.0),
            "next_obs": ref_stack(hist, g + m, cfg.stack, oldest), "m": m, "g": g, "steps": steps}


def record_at(replay: FrameReplay, pos: int) -> int | None:
    """g of the record held at slot pos of every stream, None when the slot was never written."""
    oldest = replay.count - replay.size
    age = (pos - oldest) % replay.length
    return oldest + age if age < replay.size else None


def assert_batch(out: dict, refs: list[dict]) -> None:
    """A batch from FrameReplay equals the reference transitions, row by row."""
    assert out["obs"].dtype == np.uint8 and out["next_obs"].dtype == np.uint8
    np.testing.assert_array_equal(out["obs"], np.stack([r["obs"] for r in refs]))
    np.testing.assert_array_equal(out["next_obs"], np.stack([r["next_obs"] for r in refs]))
    np.testing.assert_array_equal(out["action"], [r["action"] for r in refs])
    np.testing.assert_allclose(out["reward"], [r["reward"] for r in refs], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["discount"], [r["discount"] for r in refs], rtol=1e-6, atol=0)


def check_all_slots(replay: FrameReplay, streams: Streams, cfg: Cfg) -> tuple[dict[int, dict], int]:
    """Every slot against the reference: _valid accepts only legal starts, and every legal start except the K-1
    oldest records of a wrapped stream (the documented conservative rule); num_starts() counts the accepted ones;
    batch() over all of them equals the reference. Returns ({slot: reference} of accepted starts, the number of
    legal starts the conservative rule rejected)."""
    num, length = cfg.num_envs * cfg.length, cfg.length
    env, pos = np.divmod(np.arange(num), length)
    valid = replay._valid(env, pos)
    oldest = replay.count - replay.size
    refs, rejected = {}, 0
    for slot in range(num):
        g = record_at(replay, pos[slot])
        ref = None if g is None else ref_transition(streams.hist[env[slot]], g, replay.count, cfg)
        if valid[slot]:
            assert ref is not None, f"accepted slot {slot} (record {g}) is no legal start"
            refs[slot] = ref
        elif ref is not None:
            assert replay.count > length and g - oldest < cfg.stack - 1, f"legal start {g} in slot {slot} rejected"
            rejected += 1
    assert replay.num_starts() == len(refs)
    if refs:
        slots = np.array(sorted(refs))
        assert_batch(replay.batch(*np.divmod(slots, length)), [refs[s] for s in slots])
    return refs, rejected


def wrapped(cfg: Cfg, prioritized: bool, replay_seed: int, stream_seed: int
            ) -> tuple[FrameReplay, Streams, dict[int, dict]]:
    """A replay after 40 calls of E random streams (wrapped several times) and its accepted starts (slot ->
    reference transition), checked against the reference."""
    replay, streams = cfg.replay(prioritized=prioritized, seed=replay_seed), Streams(cfg.num_envs, seed=stream_seed)
    for _ in range(40):
        streams.step(replay)
    refs, _ = check_all_slots(replay, streams, cfg)
    return replay, streams, refs


# ---------------------------------------------------------------------------------- FrameReplay vs reference


@pytest.mark.parametrize("life_loss_terminal", [False, True], ids=["life_goes_on", "life_terminal"])
@pytest.mark.parametrize("reward_clip", [False, True], ids=["raw", "clipped"])
def test_hand_worked_batches(life_loss_terminal, reward_clip):
    """One stream, K = 2, n = 3, gamma 1/2, worked by hand. Records (frame value, reward, flags):
    0 (10, 1, first)  1 (11, 2, life lost)  2 (12, 4, truncated)  3 (13, final)  4 (14, 8, first, terminated)
    5 (15, final)  6 (16, -3, first)  7 (17, 1). Starts 0..2 stop after the truncation (or after the life loss
    when it is terminal), 4 is terminal, 6 has no successor for its second step; 3, 5 (final) and 7 (no
    successor) are no starts."""
    cfg = Cfg(stack=2, n_step=3, gamma=0.5, num_envs=1, length=10, reward_clip=reward_clip,
              life_loss_terminal=life_loss_terminal)
    replay = cfg.replay()
    table = [(1, "first"), (2, "life_lost"), (4, "truncated"), (0, "final"), (8, "first terminated"), (0, "final"),
             (-3, "first"), (1, "")]
    for j, (reward, flags) in enumerate(table):
        flag = {name: np.array([name in flags.split()]) for name in
                ("terminated", "truncated", "life_lost", "first", "final")}
        replay.add(np.full((1, *FRAME), 10 + j, np.uint8), np.array([j]), np.array([reward], np.float32), **flag)
    starts = np.array([0, 1, 2, 4, 6])
    assert replay._valid(np.zeros(10, np.int64), np.arange(10)).tolist() == [j in starts for j in range(10)]
    assert replay.num_starts() == 5
    out = replay.batch(np.zeros(5, np.int64), starts)
    if life_loss_terminal:  # 0: steps 0, 1 (life lost, terminal); 1: step 1 alone, terminal
        discount, nxt = [0, 0, 1 / 2, 0, 1 / 2], [(11, 12), (11, 12)]
        reward = [1 + 1 / 2, 1, 1, 1, -1] if reward_clip else [1 + 2 / 2, 2, 4, 8, -3]
    else:  # 0: steps 0, 1, 2 (truncated: bootstraps); 1: steps 1, 2
        discount, nxt = [1 / 8, 1 / 4, 1 / 2, 0, 1 / 2], [(12, 13), (12, 13)]
        reward = [1 + 1 / 2 + 1 / 4, 1 + 1 / 2, 1, 1, -1] if reward_clip else [1 + 2 / 2 + 4 / 4, 2 + 4 / 2, 4, 8, -3]
    np.testing.assert_allclose(out["reward"], reward, rtol=1e-6)
    np.testing.assert_allclose(out["discount"], discount, rtol=1e-6)
    assert out["action"].tolist() == [0, 1, 2, 4, 6]
    assert out["obs"][:, :, 0, 0].tolist() == [[0, 10], [10, 11], [11, 12], [0, 14], [0, 16]]
    assert out["next_obs"][:, :, 0, 0].tolist() == [list(v) for v in nxt] + [[12, 13], [14, 15], [16, 17]]
    # The brute-force reference of the tests below agrees with these hand-worked numbers.
    hist = [Record(np.full(FRAME, 10 + j, np.uint8), j, reward, **{f: True for f in flags.split()})
            for j, (reward, flags) in enumerate(table)]
    refs = [ref_transition(hist, g, len(table), cfg) for g in range(len(table))]
    assert [g for g, ref in enumerate(refs) if ref is not None] == starts.tolist()
    assert_batch(out, [refs[g] for g in starts])


CONFIGS = [Cfg(4, 3, True, True), Cfg(4, 3, False, False), Cfg(1, 3, True, False), Cfg(1, 1, False, True),
           Cfg(4, 1, True, False)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_frame_replay_matches_reference(cfg):
    """75 calls of 3 streams of 12 records (6 wraps): after every call every slot is checked against the
    reference (check_all_slots), and 16 starts from sample_indices are legal, have mass 1 and give the reference
    batch. The run must cover what the reference distinguishes, so no case passes for want of data."""
    replay, streams = cfg.replay(seed=1), Streams(cfg.num_envs, seed=2)
    seen = collections.Counter()
    for _ in range(75):
        streams.step(replay)
        if replay.count < 2:
            with pytest.raises(ValueError):
                replay.sample_indices(4)
            continue
        refs, rejected = check_all_slots(replay, streams, cfg)
        seen["rejected"] += rejected
        for ref in refs.values():
            last = ref["steps"][-1]
            ended = last.terminated or last.truncated or (cfg.life_loss_terminal and last.life_lost)
            seen["terminated"] += last.terminated
            seen["life_terminal"] += cfg.life_loss_terminal and last.life_lost and not last.terminated
            seen["life_ignored"] += not cfg.life_loss_terminal and any(s.life_lost for s in ref["steps"])
            seen["truncated"] += last.truncated and not last.terminated and ref["discount"] > 0
            seen["short"] += ref["m"] < cfg.n_step and not ended
            seen["padded"] += bool(np.any(np.all(ref["obs"] == 0, axis=(1, 2))))
            seen["big_reward"] += any(abs(s.reward) > 1 for s in ref["steps"])
        env, pos, mass = replay.sample_indices(16)
        np.testing.assert_array_equal(mass, 1.0)
        slots = env * cfg.length + pos
        assert all(s in refs for s in slots)
        assert_batch(replay.batch(env, pos), [refs[s] for s in slots])
        seen["sampled"] += len(slots)
    assert replay.count == 75 > 5 * cfg.length
    assert seen["terminated"] and seen["truncated"] and seen["big_reward"] and seen["sampled"], seen
    assert seen["life_terminal" if cfg.life_loss_terminal else "life_ignored"] > 0, seen
    assert cfg.life_loss_terminal or not seen["life_terminal"]
    if cfg.n_step > 1:
        assert seen["short"] > 0, seen
    if cfg.stack > 1:
        assert seen["padded"] > 0 and seen["rejected"] > 0, seen
    else:
        assert seen["rejected"] == 0


def test_uniform_sampling_is_uniform_over_starts():
    """100k uniform draws over the accepted starts of a wrapped replay (finals among the held records, so
    rejection happens): only accepted starts are drawn, each within 4 standard errors of 1 / #starts."""
    cfg = Cfg()
    replay, streams, refs = wrapped(cfg, False, 4, 5)
    assert any(replay.final[e, p] for e in range(cfg.num_envs) for p in range(cfg.length))
    draws = []
    for _ in range(100):
        env, pos, _ = replay.sample_indices(1000)
        draws.append(env * cfg.length + pos)
    counts = np.bincount(np.concatenate(draws), minlength=cfg.num_envs * cfg.length)
    starts = np.array(sorted(refs))
    assert counts.sum() == counts[starts].sum() == 100_000
    p = 1 / len(starts)
    assert np.all(np.abs(counts[starts] / 100_000 - p) <= 4 * np.sqrt(p * (1 - p) / 100_000)), counts[starts]


def test_uniform_draws_from_a_prioritized_replay_with_a_generator_of_their_own():
    """The analysis draws: uniform over the accepted starts even when priorities are skewed (mass 1 each), from
    the generator given, leaving the replay's own generator (the training's draws) where it was."""
    cfg = Cfg()
    replay, streams, refs = wrapped(cfg, True, 4, 5)
    starts = np.array(sorted(refs))
    replay.update_priorities(starts[:1], np.array([1e6]))  # nearly all prioritized mass on one start
    before = replay.rng.bit_generator.state
    rng = np.random.default_rng(6)
    env, pos, mass = replay.sample_indices(100_000, rng=rng, uniform=True)
    assert replay.rng.bit_generator.state == before and (mass == 1).all()
    counts = np.bincount(env * cfg.length + pos, minlength=cfg.num_envs * cfg.length)
    assert counts.sum() == counts[starts].sum() == 100_000
    p = 1 / len(starts)
    assert np.all(np.abs(counts[starts] / 100_000 - p) <= 4 * np.sqrt(p * (1 - p) / 100_000)), counts[starts]
    again = replay.sample_indices(100_000, rng=np.random.default_rng(6), uniform=True)
    np.testing.assert_array_equal(again[0], env)


# -------------------------------------------------------------------------------------------------- prioritized


def test_tree_mass_on_legal_starts_only():
    """Prioritized, no updates: after every call the tree never puts mass on a slot that is no accepted start;
    once the streams have wrapped, the slots with mass are exactly the accepted starts (the reference's legal
    starts less the conservative rule), each with max_priority^alpha = 1, and the total is their count."""
    cfg = Cfg()
    replay, streams = cfg.replay(prioritized=True), Streams(cfg.num_envs, seed=6)
    everything = np.arange(cfg.num_envs * cfg.length)
    for _ in range(60):
        streams.step(replay)
        refs, _ = check_all_slots(replay, streams, cfg)
        mass = replay.tree.get(everything)
        assert set(np.flatnonzero(mass)) <= set(refs)
        if replay.count > cfg.length:
            assert set(np.flatnonzero(mass)) == set(refs)
            np.testing.assert_array_equal(mass[sorted(refs)], 1.0)
            assert replay.tree.total == len(refs)


def test_tree_mass_while_filling():
    """While the streams fill for the first time (no wrap yet), every start _valid accepts has mass: one
    episode, 10 records per stream, K = 4, n = 1."""
    cfg = Cfg(stack=4, n_step=1, num_envs=1, length=10)
    replay, streams = cfg.replay(prioritized=True), Streams(1, seed=0, p_term=0.0, p_trunc=0.0)
    for _ in range(cfg.length):
        streams.step(replay)
        pos = np.arange(cfg.length)
        np.testing.assert_array_equal(replay.tree.get(pos) > 0, replay._valid(np.zeros_like(pos), pos),
                                      err_msg=f"count {replay.count}")


class SeqRng:
    """Stands in for replay.rng: random() returns the given arrays in turn, then draws from a real generator."""

    def __init__(self, *arrays):
        self.arrays, self.rng = list(arrays), np.random.default_rng(0)

    def random(self, n):
        return np.asarray(self.arrays.pop(0)) if self.arrays else self.rng.random(n)


def test_prioritized_guard_against_empty_leaves():
    """Uniforms that round the last stratum's target up to the total (u = 1 - 2^-53 with B = 4) send the tree
    search to its last leaf, a padding leaf without mass (36 slots, 64 leaves): sample_indices draws again, so
    every slot it returns is an accepted start with mass."""
    cfg = Cfg()
    replay, streams, refs = wrapped(cfg, True, 0, 17)
    replay.rng = SeqRng(np.full(4, np.nextafter(1.0, 0.0)))
    env, pos, mass = replay.sample_indices(4)
    assert not replay.rng.arrays  # the crafted uniforms were used
    assert set((env * cfg.length + pos).tolist()) <= set(refs)
    assert np.all(mass > 0)


def test_update_priorities():
    """update_priorities sets p^alpha on accepted starts (the last of a duplicated slot wins), leaves slots that
    are no start at 0 (the newest record, the oldest of a wrapped stream, a final record), raises max_priority to
    the largest priority given and never lowers it; starts made after that get max_priority^alpha."""
    cfg = Cfg()
    replay, streams, refs = wrapped(cfg, True, 0, 7)
    everything = np.arange(cfg.num_envs * cfg.length)
    starts = sorted(refs)
    newest = (replay.cursor - 1) % cfg.length  # no successor
    oldest = replay.cursor % cfg.length  # age 0 of a wrapped stream
    finals = [s for s in everything if replay.final[divmod(s, cfg.length)]]
    assert finals and newest != oldest
    bad = [newest, cfg.length + oldest, finals[0]]
    assert not set(bad) & set(refs)
    before = replay.tree.get(everything).copy()
    a, b = starts[0], starts[5]
    replay.update_priorities(np.array([a, b, *bad, a]), np.array([4.0, 0.25, 16.0, 9.0, 25.0, 2.25]))
    expected = before.copy()
    expected[a], expected[b] = 1.5, 0.5
    np.testing.assert_array_equal(replay.tree.get(everything), expected)
    assert replay.max_priority == 25.0
    assert replay.tree.total == pytest.approx(expected.sum())
    replay.update_priorities(np.array([b]), np.array([0.5]))
    assert replay.max_priority == 25.0
    assert replay.tree.get([b]).tolist() == [pytest.approx(0.5**0.5)]
    streams.step(replay)  # the previous newest records get their successors: new starts of mass 25^0.5 = 5
    refs, _ = check_all_slots(replay, streams, cfg)
    new = [e * cfg.length + newest for e in range(cfg.num_envs)]
    mass = replay.tree.get(new)
    np.testing.assert_array_equal(mass, [5.0 if s in refs else 0.0 for s in new])
    assert (mass == 5.0).any()


def test_importance_weights_and_prioritized_batches():
    """sample(B, beta): the slots are accepted starts whose batch equals the reference; the weights are
    (mass_i / min mass)^(-beta) with the largest exactly 1; beta = 0, and uniform sampling, give ones."""
    cfg = Cfg()
    replay, streams, refs = wrapped(cfg, True, 8, 9)
    starts = np.array(sorted(refs))
    priorities = 1.0 + np.arange(len(starts))
    replay.update_priorities(starts, priorities)
    wanted = dict(zip(starts.tolist(), priorities**ALPHA, strict=True))
    for beta in (0.0, 0.4, 1.0):
        out, slots = replay.sample(64, beta)
        mass = np.array([wanted[s] for s in slots])
        np.testing.assert_allclose(replay.tree.get(slots), mass)
        assert mass.max() > mass.min()
        np.testing.assert_allclose(out["weights"], (mass / mass.min()) ** -beta, rtol=1e-6)
        assert out["weights"].max() == 1.0
        assert_batch(out, [refs[s] for s in slots])
    out, _ = replay.sample(32, 0.0)
    assert out["weights"].tolist() == [1.0] * 32
    uniform = cfg.replay(seed=8)
    streams = Streams(cfg.num_envs, seed=9)
    for _ in range(40):
        streams.step(uniform)
    assert uniform.sample(32, 0.7)[0]["weights"].tolist() == [1.0] * 32


def test_prioritized_frequencies():
    """All starts at priority 0 except three at 1, 4, 9 (masses 1, 2, 3 for alpha 1/2): 60k draws hit only those,
    with frequencies within 4 standard errors of 1/6, 2/6, 3/6."""
    cfg = Cfg()
    replay, streams, refs = wrapped(cfg, True, 10, 11)
    starts = np.array(sorted(refs))
    replay.update_priorities(starts, np.zeros(len(starts)))
    chosen = starts[[0, len(starts) // 2, -1]]
    replay.update_priorities(chosen, np.array([1.0, 4.0, 9.0]))
    draws = []
    for _ in range(200):
        env, pos, mass = replay.sample_indices(300)
        draws.append(env * cfg.length + pos)
    draws = np.concatenate(draws)
    counts = np.array([(draws == s).sum() for s in chosen])
    assert counts.sum() == len(draws) == 60_000
    p = np.array([1.0, 2.0, 3.0]) / 6
    assert np.all(np.abs(counts / len(draws) - p) <= 4 * np.sqrt(p * (1 - p) / len(draws))), counts


# ---------------------------------------------------------------------------------------------------------- cut


@pytest.mark.parametrize("prioritized", [False, True], ids=["uniform", "prioritized"])
def test_cut(prioritized):
    """After cut() the newest record of every stream is final: never sampled, no start there (not even once it
    has a successor), and every n-step window stops at it (some stop there early). Streams then go on with a
    first=True record, whose stack is zeros but for its own frame, and everything still matches the reference."""
    cfg = Cfg()
    replay, streams = cfg.replay(prioritized=prioritized, seed=12), Streams(cfg.num_envs, seed=13)
    for _ in range(30):
        streams.step(replay)
    cut_g = replay.count - 1
    cut_slots = {e * cfg.length + cut_g % cfg.length for e in range(cfg.num_envs)}
    streams.cut(replay)
    refs, _ = check_all_slots(replay, streams, cfg)
    stopped = 0
    for ref in refs.values():
        assert ref["g"] + ref["m"] <= cut_g
        last = ref["steps"][-1]
        stopped += ref["g"] + ref["m"] == cut_g and ref["m"] < cfg.n_step and not (last.terminated or last.truncated)
    assert stopped > 0
    for call in range(10):
        env, pos, _ = replay.sample_indices(500)
        assert not set((env * cfg.length + pos).tolist()) & cut_slots
        if prioritized:
            assert replay.tree.get(sorted(cut_slots)).tolist() == [0.0] * cfg.num_envs
        streams.step(replay)
        refs, _ = check_all_slots(replay, streams, cfg)
        assert not set(refs) & cut_slots
        if call == 0:
            first = np.full(cfg.num_envs, (cut_g + 1) % cfg.length)
            obs = replay.stacks(np.arange(cfg.num_envs), first)
            for e in range(cfg.num_envs):
                assert streams.hist[e][cut_g + 1].first
                np.testing.assert_array_equal(obs[e, :-1], 0)
                np.testing.assert_array_equal(obs[e, -1], streams.hist[e][cut_g + 1].frame)
    assert replay.count - 1 - cut_g == 10 < cfg.length  # the cut records are still held


# ------------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("prioritized", [False, True], ids=["uniform", "prioritized"])
def test_state_round_trip(prioritized):
    """A fresh replay loaded from another's state() (through an .npz file, as a checkpoint) samples identical
    batches and slots from identically seeded rngs, also after both get the same new records."""
    cfg = Cfg()
    a, streams = cfg.replay(prioritized=prioritized, seed=14), Streams(cfg.num_envs, seed=15)
    for _ in range(40):
        streams.step(a)
    if prioritized:
        _, slots = a.sample(8, 0.5)
        a.update_priorities(slots, np.arange(1.0, 9.0) * 1.5)
        assert a.max_priority == 12.0
    buf = io.BytesIO()
    np.savez(buf, **a.state())
    buf.seek(0)
    with np.load(buf) as f:
        state = {k: f[k] for k in f.files}
    b = cfg.replay(prioritized=prioritized, seed=99)
    b.load_state(state)
    assert (b.cursor, b.count, b.max_priority) == (a.cursor, a.count, a.max_priority)
    for _ in range(3):
        a.rng, b.rng = np.random.default_rng(0), np.random.default_rng(0)
        for _ in range(3):
            (out_a, slots_a), (out_b, slots_b) = a.sample(16, 0.5), b.sample(16, 0.5)
            np.testing.assert_array_equal(slots_a, slots_b)
            assert out_a.keys() == out_b.keys()
            for key in out_a:
                np.testing.assert_array_equal(out_a[key], out_b[key])
        streams.step(a, b)
        if prioritized:
            np.testing.assert_array_equal(a.tree.tree, b.tree.tree)
    refs, _ = check_all_slots(b, streams, cfg)  # the loaded replay also matches the reference
    assert refs


# ------------------------------------------------------------------------------------------ errors and memory


def test_errors():
    """A capacity that is not a multiple of num_envs, or holds too few records per stream, is refused naming
    replay_capacity; sampling before a transition exists (0 or 1 records) raises ValueError, uniform and
    prioritized; with 2 records the only start is record 0 of each stream."""
    with pytest.raises(ValueError, match="replay_capacity"):
        FrameReplay(37, 3, FRAME, np.uint8, 4, 3, 0.9, True, True)
    with pytest.raises(ValueError, match="replay_capacity"):
        FrameReplay(21, 3, FRAME, np.uint8, 4, 3, 0.9, True, True)  # 7 < K + n + 1 records per stream
    for prioritized in (False, True):
        replay, streams = Cfg().replay(prioritized=prioritized), Streams(3, seed=16)
        for _ in range(2):
            with pytest.raises(ValueError, match="replay"):
                replay.sample_indices(4)
            with pytest.raises(ValueError):
                replay.sample(4)
            streams.step(replay)
        env, pos, _ = replay.sample_indices(64)
        assert pos.tolist() == [0] * 64
        assert set(env.tolist()) == {0, 1, 2}


def test_atari_nbytes():
    """Atari: 1M records of 84x84 uint8 frames in 8 streams, prioritized, hold 7.056e9 bytes of frames plus
    13 bytes a record (action, reward, 5 flags) plus a 2^21-node float64 tree: <= 7.5e9. The arrays are never
    written, so the OS never backs them with memory."""
    replay = FrameReplay(1_000_000, 8, (84, 84), np.uint8, 4, 3, 0.99, True, True, prioritized=True)
    expected = 1_000_000 * 84 * 84 + 1_000_000 * (4 + 4 + 5) + 2 * 2**20 * 8
    assert replay.nbytes() == expected
    assert 7.056e9 <= replay.nbytes() <= 7.5e9
