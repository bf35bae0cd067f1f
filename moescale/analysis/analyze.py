"""`moescale analyze`: plasticity and routing metrics of a run's saved parameters over training, on held-out
transitions, and expert-subset inference of a trained Soft MoE agent; for runs of the compiled trainer (JAX
environments) and of the host trainer (Atari, gym:<id>) alike.

Parameters come from the run's snapshots (kept every analysis_every iterations, moescale.train.snapshots)
and its newest checkpoint. The held-out batch of each seed is drawn from transitions of that seed's final
policy (epsilon-greedy at the run's final training epsilon) on fresh environments whose keys no training step
used, so the network has never learnt from it; every snapshot of the seed is measured on that same batch.
Gradient norms are those of the agent's loss on that batch with one-step targets from the snapshot's own
parameters (snapshots keep no target network).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from moescale.agents import Agent, make_agent
from moescale.analysis.expert_subset import soft_moe_subset_apply
from moescale.config import TrainConfig
from moescale.envs import JaxEnv, make_env
from moescale.layers import SoftMoE
from moescale.networks import Network, build_network
from moescale.networks.metrics import network_metrics
from moescale.replay.nstep import LearnBatch
from moescale.train.checkpoint import latest_checkpoint, load_checkpoint
from moescale.train.rollout import collect_transitions, episode_returns_of
from moescale.train.run import load_run_config
from moescale.train.snapshots import list_snapshots, load_snapshot

HELD_OUT_KEY = 0xA11A  # folded into the run's seed: no training or evaluation key is ever this one
HELD_OUT_ENVS = 16
HELD_OUT_STEPS = 1000  # per environment: the held-out batch is drawn from 16,000 transitions at least
SUBSET_MODES = ("best", "random")
# Plotted when present, in this order: (column, axis label).
PLOTTED = (("dormant0.1", "dormant fraction (tau 0.1)"), ("dormant0", "dead fraction (tau 0)"),
           ("srank", "srank of features"), ("feature_norm", "feature norm"), ("param_norm", "parameter norm"),
           ("grad_norm", "gradient norm"), ("ntk_rank", "empirical NTK rank"),
           ("feature_state_sensitivity", "state sensitivity of features"),
           ("q_state_sensitivity", "state sensitivity of Q-values"),
           ("dispatch_entropy", "dispatch entropy per slot, over tokens (nats)"),
           ("combine_entropy", "combine entropy per token, over slots (nats)"))
ROUTED = ("dispatch_entropy", "combine_entropy")  # plotted for runs with experts only (a dense layer records 0)


class AnalysisError(Exception):
    """The analysis cannot run; the message is one line for the user."""


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: compiled helpers are cached per run
class RunParts:
    """What a run directory's config builds: environment, network and agent."""

    run_dir: Path
    config: TrainConfig
    env: JaxEnv | None  # None for a host-trainer run: its environments are made when needed (make_host_env)
    network: Network
    agent: Agent


def load_run(run_dir: Path) -> RunParts:
    """The environment, network and agent of the run in `run_dir` (AnalysisError if it is not one)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise AnalysisError(f"run={str(run_dir)!r}: not a run directory (no config.yaml)")
    config = load_run_config(run_dir)
    from moescale.envs.host import env_spaces, is_host_env

    env = None if is_host_env(config.env) else make_env(config.env, config.sticky_prob, config.max_episode_steps)
    network = build_network(config.network, *env_spaces(config.env, config.sticky_prob, config.max_episode_steps))
    return RunParts(run_dir, config, env, network, make_agent(network, config.agent))


def _host_env(parts: RunParts, num_envs: int) -> Any:
    from moescale.envs.host import make_host_env

    cfg = parts.config
    return make_host_env(cfg.env, num_envs, cfg.sticky_prob, cfg.max_episode_steps, seed=cfg.seed + HELD_OUT_KEY)


def _epsilon_greedy(q: Callable[[Any, jax.Array, jax.Array], jax.Array], params: Any, obs: jax.Array,
                    key: jax.Array, epsilon: Any, num_actions: int) -> jax.Array:
    """Actions (N,) int32: argmax of q(params, obs), a uniformly random action with probability epsilon."""
    key_q, key_explore, key_random = jax.random.split(key, 3)
    greedy = jnp.argmax(q(params, obs, key_q), axis=-1).astype(jnp.int32)
    random = jax.random.randint(key_random, greedy.shape, 0, num_actions, jnp.int32)
    return jnp.where(jax.random.uniform(key_explore, greedy.shape) < epsilon, random, greedy)


def _host_act(q: Callable[[Any, jax.Array, jax.Array], jax.Array], epsilon: float, env: Any
              ) -> Callable[[Any, np.ndarray, jax.Array], jax.Array]:
    """(params (S, ...), stacks (S, N, K, *F), keys (S,)) -> actions (S, N) on host env `env`, epsilon-greedy in
    Q-function q; jitted."""
    from moescale.envs.host import stack_to_obs

    frame_ndim, num_actions = len(env.frame_shape), env.num_actions

    def one(params: Any, stacks: jax.Array, key: jax.Array) -> jax.Array:
        return _epsilon_greedy(q, params, stack_to_obs(stacks, frame_ndim), key, epsilon, num_actions)

    return jax.jit(jax.vmap(one))


def saved_params(parts: RunParts) -> list[tuple[int, Any]]:
    """(iteration, stacked online params (S, ...)) of every snapshot, plus the newest checkpoint when it is
    newer than the last snapshot; oldest first. AnalysisError if the run saved neither."""
    like = parts.network.init(jax.random.key(0))
    found = list_snapshots(parts.run_dir)
    params = [(it, load_snapshot(path, like)) for it, path in found]
    last = latest_checkpoint(parts.run_dir / "checkpoints")
    if last is not None and (not found or last > found[-1][0]):
        if parts.env is None:  # a host run's checkpoint: {"agent": stacked agent states, "keys": (S,)}
            keys = jax.random.split(jax.random.key(0), parts.config.seeds)
            shape = jax.eval_shape(lambda: {"agent": jax.vmap(parts.agent.init)(keys), "keys": keys})
            state, _ = load_checkpoint(parts.run_dir / "checkpoints", last, shape)
            params.append((last, state["agent"].params))
        else:
            from moescale.train.anakin import make_trainer, seed_keys

            trainer = make_trainer(parts.config)
            shape = jax.eval_shape(lambda: trainer.layout.stack(trainer.init(seed_keys(parts.config))))
            state, _ = load_checkpoint(parts.run_dir / "checkpoints", last, shape)
            params.append((last, state.agent.params))
    if not params:
        raise AnalysisError(f"run={str(parts.run_dir)!r}: no snapshots or checkpoints to analyze (train with "
                            "--set analysis_every=K to keep snapshots)")
    return params


def seed_params(stacked: Any, seed: int) -> Any:
    """One seed's params from stacked params (S, ...)."""
    return jax.tree.map(lambda x: x[seed], stacked)


def held_out_batch(parts: RunParts, params: Any, seed: int, size: int) -> LearnBatch:
    """`size` one-step transitions of the policy `params` (epsilon-greedy at the final training epsilon) on
    fresh environments seeded apart from training and evaluation, drawn without replacement from
    HELD_OUT_ENVS x max(HELD_OUT_STEPS, size / HELD_OUT_ENVS) steps: states from all through the episodes,
    not only their starts, in random order (so any prefix, e.g. the NTK's observations, is a random draw)."""
    cfg = parts.config
    key_run, key_pick = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed + HELD_OUT_KEY), seed))
    steps = max(HELD_OUT_STEPS, -(-size // HELD_OUT_ENVS))
    if parts.env is None:
        data = _host_transitions(parts, params, key_run, cfg.seed + HELD_OUT_KEY + seed, steps)
    else:
        data = _collector(parts, steps)(params, key_run)
        data = {"obs": data.obs, "action": data.action, "reward": data.reward, "terminated": data.terminated,
                "next_obs": data.next_obs}
    pick = jax.random.permutation(key_pick, data["reward"].shape[0])[:size]
    data = {name: jnp.asarray(value)[pick] for name, value in data.items()}
    discount = cfg.agent.gamma * (1.0 - data["terminated"].astype(jnp.float32))
    return LearnBatch(data["obs"], data["action"], data["reward"], discount, data["next_obs"],
                      jnp.ones_like(data["reward"]))


def _host_transitions(parts: RunParts, params: Any, key: jax.Array, env_seed: int, calls: int) -> dict[str, Any]:
    """collect_transitions of the policy on a host env (HELD_OUT_ENVS of them, reset with env_seed), the stacks
    turned into the network's observations."""
    from moescale.envs.host import collect_transitions, stack_to_obs

    env = _host_env(parts, HELD_OUT_ENVS)
    frame_ndim = len(env.frame_shape)
    act = _host_policy(parts, frame_ndim)
    try:
        data = collect_transitions(env, lambda stacks, t: np.asarray(act(params, stacks, jax.random.fold_in(key, t))),
                                   env_seed, calls)
    finally:
        env.close()
    return {**data, "obs": stack_to_obs(data["obs"], frame_ndim),
            "next_obs": stack_to_obs(data["next_obs"], frame_ndim)}


@functools.lru_cache(maxsize=8)
def _host_policy(parts: RunParts, frame_ndim: int) -> Callable[[Any, np.ndarray, jax.Array], jax.Array]:
    """(params, stacks (N, K, *F), key) -> actions (N,) of the held-out policy (_collector's), jitted once per run."""
    from moescale.envs.host import stack_to_obs

    eps = jnp.float32(parts.config.agent.eps_end)
    return jax.jit(lambda params, stacks, key: parts.agent.act(params, stack_to_obs(stacks, frame_ndim), key, eps,
                                                                noise=False))


@functools.lru_cache(maxsize=8)
def _collector(parts: RunParts, steps: int) -> Callable[[Any, jax.Array], Any]:
    """One compiled rollout per run and length, the policy's params an argument (every seed reuses it)."""
    eps = jnp.float32(parts.config.agent.eps_end)

    def collect(params: Any, key: jax.Array) -> Any:
        def act(obs: jax.Array, k: jax.Array) -> jax.Array:
            return parts.agent.act(params, obs, k, eps, noise=False)

        return collect_transitions(parts.env, act, key, HELD_OUT_ENVS, steps)

    return jax.jit(collect)


def analyze_run(run_dir: Path, batch: int = 256, progress: bool = True) -> list[dict[str, Any]]:
    """Metrics of every saved parameter set of every seed on held-out transitions; writes
    run_dir/analysis.parquet and run_dir/analysis.png and returns the rows."""
    parts = load_run(run_dir)
    saved = saved_params(parts)
    cfg = parts.config
    final = saved[-1][1]
    measure = jax.jit(lambda p, b, k: network_metrics(parts.network, parts.agent.loss, p, p, b, k))
    rows = []
    bar = tqdm(total=cfg.seeds * len(saved), disable=not progress, unit="params", desc=f"analyze {run_dir}")
    for s in range(cfg.seeds):
        held_out = held_out_batch(parts, seed_params(final, s), s, batch)
        for iteration, stacked in saved:
            key = jax.random.fold_in(jax.random.key(cfg.seed + HELD_OUT_KEY + 1), iteration)
            found = jax.device_get(measure(seed_params(stacked, s), held_out, key))
            rows.append({"iteration": iteration, "agent_steps": min(iteration * cfg.iteration_steps, cfg.steps),
                         "seed": s, **{k: float(v) for k, v in found.items()}})
            bar.update(1)
    bar.close()
    _write_parquet(Path(run_dir) / "analysis.parquet", rows)
    plot_metrics({_label(parts): rows}, Path(run_dir) / "analysis.png")
    return rows


def _label(parts: RunParts) -> str:
    net = parts.config.network
    arch = f"dense x{net.width_multiplier}" if net.moe == "dense" else f"{net.moe}-{net.num_experts}"
    name = parts.run_dir.name
    return name if arch in name else f"{name} ({arch})"


def short_labels(paths: list[Path]) -> list[str]:
    """Names for runs in a figure: the fewest trailing path components that tell the paths apart
    (x/dense, x/softmoe-4 -> dense, softmoe-4; a/seed0, b/seed0 -> a/seed0, b/seed0)."""
    parts = [Path(p).parts for p in paths]
    for k in range(1, max((len(p) for p in parts), default=0) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]  # the same path twice


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.Table.from_pylist([{k: r.get(k, math.nan) for k in fields} for r in rows])
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Write the figure to a temporary name, then rename it to `path` (a reader never sees half a PNG); `rect`:
    the part of the figure the panels fill (the rest holds a figure legend)."""
    fig.tight_layout(rect=rect)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _by_step(rows: list[dict[str, Any]], column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Agent steps, mean and sd over seeds of a column."""
    steps = sorted({r["agent_steps"] for r in rows})
    values = [[r[column] for r in rows if r["agent_steps"] == x and not math.isnan(r.get(column, math.nan))]
              for x in steps]
    keep = [i for i, v in enumerate(values) if v]
    return (np.array([steps[i] for i in keep]), np.array([np.mean(values[i]) for i in keep]),
            np.array([np.std(values[i]) for i in keep]))


def metric_panels(runs: dict[str, list[dict[str, Any]]]
                  ) -> tuple[list[tuple[str, str, list[str]]], list[tuple[str, list[str]]]]:
    """What plot_metrics draws: (column, label, runs drawn) per metric panel, in PLOTTED order, and (run, its
    expert_importance_i columns in expert order) for each run with more than one expert. Routing entropies are
    drawn for runs with experts only."""
    experts = [(name, sorted({k for r in rows for k in r if k.startswith("expert_importance_")},
                             key=lambda k: int(k.rsplit("_", 1)[1]))) for name, rows in runs.items()]
    experts = [(name, keys) for name, keys in experts if len(keys) > 1]
    routed = {name for name, _ in experts}
    columns = []
    for column, label in PLOTTED:
        names = [name for name, rows in runs.items() if any(column in r for r in rows)
                 and (column not in ROUTED or name in routed)]
        if names:
            columns.append((column, label, names))
    return columns, experts


def plot_metrics(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One panel per metric against agent steps, one line per run (mean over seeds, band +- sd; a point with an
    error bar for a single snapshot), routing entropies for the runs with experts, plus each such run's expert
    importance; one legend under the panels; saved to `path`."""
    plt = _pyplot()
    columns, experts = metric_panels(runs)
    panels = len(columns) + len(experts)
    cols = min(4, panels)
    fig, axes = plt.subplots(-(-panels // cols), cols, figsize=(4.2 * cols, 3.3 * -(-panels // cols)),
                             squeeze=False)
    axes = axes.ravel()
    colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}  # a run keeps its colour in every panel
    for ax, (column, label, names) in zip(axes, columns, strict=False):
        for name in names:
            x, mean, sd = _by_step(runs[name], column)
            if len(x) == 1:  # one snapshot: a point with an error bar (a band needs two)
                ax.errorbar(x, mean, yerr=sd, marker="o", markersize=3, capsize=3, color=colors[name], label=name)
            elif len(x):
                ax.plot(x, mean, marker="o", markersize=3, color=colors[name], label=name)
                ax.fill_between(x, mean - sd, mean + sd, color=colors[name], alpha=0.15, linewidth=0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("agent steps per seed", fontsize=8)
        ax.grid(alpha=0.3)
    for ax, (name, keys) in zip(axes[len(columns):], experts, strict=False):
        rows = runs[name]
        for key in keys:
            x, mean, _ = _by_step(rows, key)
            ax.plot(x, mean, marker="o", markersize=3, label=f"expert {key.rsplit('_', 1)[1]}")
        ax.set_title(f"expert importance: {name}", fontsize=9)
        ax.set_xlabel("agent steps per seed", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.suptitle("Held-out metrics over training (mean over seeds, band or bar +- sd)", fontsize=10)
    if not columns:
        return _save(plt, fig, path)
    # One legend for all panels, under them: run names are often longer than a panel is wide.
    named = {}  # every run once, whichever panels it is drawn in
    for ax in axes[:len(columns)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            named.setdefault(label, handle)
    handles, labels = list(named.values()), list(named)
    legend_rows = -(-len(labels) // 2)
    fig.legend(handles, labels, loc="lower center", ncol=min(2, len(labels)), fontsize=8, frameon=False)
    bottom = (0.25 * legend_rows + 0.1) / fig.get_figheight()
    return _save(plt, fig, path, rect=(0, bottom, 1, 1))


# ------------------------------------------------------------------------------------ expert-subset inference


def subset_q_fn(network: Network, k: int | None, mode: str = "best", renormalize: bool = False
                ) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """(params, obs, key) -> Q-values of the network whose Soft MoE layer runs only k experts per input
    (moescale.analysis.expert_subset; key draws the random subsets). k=None: the full network."""
    normalize = network.config.normalize

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if not isinstance(module, SoftMoE) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        (x,) = args
        y = soft_moe_subset_apply(module.variables["params"], x, k, normalize=normalize, mode=mode,
                                  key=module.make_rng("subset") if mode == "random" else None,
                                  renormalize=renormalize)
        return y.astype(x.dtype)

    def q_values(params: Any, obs: jax.Array, key: jax.Array) -> jax.Array:
        with nn.intercept_methods(interceptor):
            return network.apply(params, obs, rngs={"subset": key}).q_values

    return q_values


def _median_ms(fn: Callable, args: tuple, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _flops(fn: Callable, *args: Any) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    return float(cost.get("flops", math.nan)) if cost else math.nan


def expert_subset_eval(run_dir: Path, episodes: int | None = None, batch: int = 256, renormalize: bool = False,
                       repeats: int = 20, progress: bool = True) -> dict[str, Any]:
    """Evaluate a trained Soft MoE agent keeping k = 1..E experts per input, best-k (by combine weight) and
    random-k: eval return, agreement of greedy actions with the full network on held-out observations, median
    inference time and XLA-counted FLOPs. Writes run_dir/expert_subset.json and expert_subset.png."""
    parts = load_run(run_dir)
    cfg, net = parts.config, parts.config.network
    if net.moe != "softmoe":
        raise AnalysisError(f"--expert-subset: needs a Soft MoE run (network.moe='softmoe'); {run_dir} has "
                            f"network.moe={net.moe!r}")
    episodes = cfg.eval_episodes if episodes is None else episodes
    iteration, stacked = saved_params(parts)[-1]
    experts = net.num_experts
    settings = [(None, "full")] + [(k, mode) for k in range(1, experts + 1) for mode in SUBSET_MODES]
    eps = jnp.float32(cfg.agent.eps_eval)
    held = jnp.stack([held_out_batch(parts, seed_params(stacked, s), s, batch).obs for s in range(cfg.seeds)])
    keys = jnp.stack([jax.random.fold_in(jax.random.key(cfg.seed + HELD_OUT_KEY + 2), s) for s in range(cfg.seeds)])
    results = []
    bar = tqdm(total=len(settings), disable=not progress, unit="setting", desc=f"expert subsets {run_dir}")
    greedy_full = None
    for k, mode in settings:
        q = subset_q_fn(parts.network, k, "best" if mode == "full" else mode, renormalize)

        def measure(params: Any, obs: jax.Array, key: jax.Array, q: Callable = q) -> tuple[jax.Array, jax.Array]:
            """Eval returns (N,) and greedy actions on the held-out observations of one seed."""
            def act(o: jax.Array, key: jax.Array) -> jax.Array:
                return _epsilon_greedy(q, params, o, key, eps, parts.env.num_actions)

            returns = episode_returns_of(parts.env, act, key, episodes, cfg.eval_max_steps)
            return returns, jnp.argmax(q(params, obs, key), axis=-1)

        if parts.env is None:
            returns = _host_returns(parts, q, stacked, keys, episodes)
            greedy = jax.device_get(jax.jit(jax.vmap(lambda p, o, k, q=q: jnp.argmax(q(p, o, k), axis=-1)))(
                stacked, held, keys))
        else:
            returns, greedy = jax.device_get(jax.jit(jax.vmap(measure))(stacked, held, keys))  # seeds at once
        greedy_full = greedy if greedy_full is None else greedy_full
        params0 = seed_params(stacked, 0)
        entry = {"k": experts if k is None else k, "mode": mode,
                 "eval_return": [float(r) for r in returns.mean(axis=1)],
                 "agreement": [float(a) for a in (greedy == greedy_full).mean(axis=1)],
                 "mean_eval_return": float(returns.mean()), "mean_agreement": float((greedy == greedy_full).mean()),
                 "flops_per_example": _flops(q, params0, held[0, :1], keys[0])}
        if mode != "random":  # random-k runs the same computation as best-k: timed once
            q_jit = jax.jit(q)
            entry["ms_batch"] = _median_ms(q_jit, (params0, held[0], keys[0]), repeats)
            entry["ms_single"] = _median_ms(q_jit, (params0, held[0, :1], keys[0]), repeats)
        results.append(entry)
        bar.update(1)
    bar.close()
    full = results[0]
    for entry in results:
        entry["flops_saved"] = 1.0 - entry["flops_per_example"] / full["flops_per_example"]
    out = {"run": str(run_dir), "env": cfg.env, "experts": experts, "seeds": cfg.seeds, "iteration": iteration,
           "agent_steps": min(iteration * cfg.iteration_steps, cfg.steps), "episodes": episodes,
           "eps_eval": cfg.agent.eps_eval, "held_out_observations": batch, "renormalize": renormalize,
           "device": jax.devices()[0].device_kind, "timing": f"median of {repeats} calls, batch {batch} and 1",
           "results": results}
    path = Path(run_dir) / "expert_subset.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    plot_expert_subset(out, Path(run_dir) / "expert_subset.png")
    return out


def _host_returns(parts: RunParts, q: Callable, stacked: Any, keys: jax.Array, episodes: int) -> np.ndarray:
    """Returns (S, episodes) of every seed's policy epsilon-greedy (eps_eval) in q, on seeds x episodes host
    environments played side by side, each cut at eval_max_steps calls."""
    from moescale.envs.host import episode_returns

    cfg = parts.config
    env = _host_env(parts, cfg.seeds * episodes)
    act = _host_act(q, cfg.agent.eps_eval, env)
    try:
        def policy(stacks: np.ndarray, t: int) -> np.ndarray:  # (S * episodes, ...) -> (S * episodes,)
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
            by_seed = stacks.reshape(cfg.seeds, episodes, *stacks.shape[1:])
            return np.asarray(act(stacked, by_seed, step_keys)).reshape(-1)

        returns = episode_returns(env, policy, cfg.seed + HELD_OUT_KEY + 3, cfg.eval_max_steps)
    finally:
        env.close()
    return returns.reshape(cfg.seeds, episodes)


def plot_expert_subset(found: dict[str, Any], path: Path) -> Path:
    """Eval return, action agreement and relative cost against the number of experts kept."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    full = found["results"][0]
    for mode, style in (("best", "o-"), ("random", "s--")):
        rows = [r for r in found["results"] if r["mode"] == mode]
        ks = [r["k"] for r in rows]
        axes[0].errorbar(ks, [r["mean_eval_return"] for r in rows], yerr=[np.std(r["eval_return"]) for r in rows],
                         fmt=style, capsize=3, label=f"{mode}-k")
        axes[1].plot(ks, [r["mean_agreement"] for r in rows], style, label=f"{mode}-k")
        if mode == "best":
            axes[2].plot(ks, [r["flops_per_example"] / full["flops_per_example"] for r in rows], "o-",
                         label="FLOPs (XLA count)")
            axes[2].plot(ks, [r["ms_batch"] / full["ms_batch"] for r in rows], "^-",
                         label=f"time, batch {found['held_out_observations']}")
            axes[2].plot(ks, [r["ms_single"] / full["ms_single"] for r in rows], "v-", label="time, batch 1")
    axes[0].axhline(full["mean_eval_return"], color="black", linestyle=":", label="all experts")
    axes[0].set_ylabel("eval return (mean over seeds, +- sd)")
    axes[1].set_ylabel("greedy actions equal to the full network's")
    axes[2].axhline(1.0, color="black", linestyle=":")
    axes[2].set_ylabel("relative to all experts")
    for ax in axes:
        ax.set_xlabel("experts kept per input (k)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Expert-subset inference: {found['env']}, {found['experts']} experts, {found['seeds']} seeds, "
                 f"{found['agent_steps']:,} agent steps ({found['device']})", fontsize=10)
    return _save(plt, fig, path)
