"""Collapse diagnostics of the penultimate layer: does it pass on what tells states apart?

Axes: B states, T tokens, D token dim, U hidden units, F penultimate features, A actions.

On MinAtar the paper's Soft MoE placement collapses at initialisation: the encoder's tokens are often exactly zero
and small otherwise, so the logits X Phi are about 0, dispatch and combine are uniform, every slot is the mean
token, every output token is about the same vector, and the Q-values hardly depend on the state. The numbers
here show that, for a new network or a trained one, next to the dense layer on the same encoder:

    dispatch_entropy_fraction   mean dispatch entropy over its maximum (Soft MoE: per slot over T tokens, ln T)
    combine_entropy_fraction    mean combine entropy over its maximum (Soft MoE: per token over E*S slots)
    zero_token_fraction         share of the layer's input tokens that are exactly zero
    token_spread                mean over states and tokens of |y_t - mean_t y| / |mean_t y|, y the output
                                tokens the head reads (after any residual path)
    dead_expert_units           share of the layer's hidden units (expert x unit) never active on the batch
    feature_state_sensitivity   of the penultimate features, and
    q_state_sensitivity         of the Q-values: sum_d Var_B(x_d) / sum_d E_B(x_d^2); 0 when every state gives
                                the same vector, 1 when the vectors have mean zero over states
    feature_srank               srank of the penultimate features over the B states (Kumar et al. 2021, delta
                                0.01): how many directions the head can tell states apart along

An entry that does not apply to a layer (routing of a dense layer, tokens of a single-token layer) is None.

Collapsed: the features span less than COLLAPSE_SRANK_RATIO of the dense layer's srank on the same states (the
output tokens all alike, so the head reads about one token's worth of state), or, at initialisation, the Q-values
vary across states less than COLLAPSE_Q_RATIO of the dense layer's (README, "Collapse diagnostics", gives the
measurements behind both thresholds). A trained run is judged by the srank alone: its Q-values carry a learnt
offset common to all states, which a fresh dense layer's do not, so their sensitivities do not compare.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moescale.config import MOE_LAYERS, NetworkConfig, TrainConfig
from moescale.layers.probes import ACTIVATIONS, FEATURES, RELU_SUFFIX, TOKENS
from moescale.networks import Network, build_network
from moescale.networks.metrics import srank, state_sensitivity

DIAGNOSE_STATES = 64  # states per batch (the measurements: 64 random-policy MinAtar states)
STATE_ENVS = 16  # environments the states are drawn from, side by side
STATE_STEPS = 100  # steps of each: states from all through the first episodes, not only their starts
METRICS = ("dispatch_entropy_fraction", "combine_entropy_fraction", "zero_token_fraction", "token_spread",
           "dead_expert_units", "feature_state_sensitivity", "q_state_sensitivity", "feature_srank")
# The thresholds of `collapsed`, as fractions of the dense layer's value on the same encoder and states. At
# initialisation on MinAtar (benchmarks/collapse_screen.py, 3 seeds x 64 random-policy states), the paper's Soft
# MoE-4 has 0.35-0.44 of the dense srank on the three games screened and Soft MoE-4 with a residual path 0.92-0.98;
# on Breakout its Q sensitivity is 0.006 of the dense layer's, with a residual path 0.47.
COLLAPSE_SRANK_RATIO = 0.5
COLLAPSE_Q_RATIO = 0.1


def token_spread(y: jax.Array) -> jax.Array:
    """Mean over states and tokens of |y_t - mean_t y| / |mean_t y| of tokens y (B, T, D): 0 when every token of a
    state is the same vector. A state whose mean token is zero counts 0 if its tokens are all zero, inf if not."""
    y = y.astype(jnp.float32)
    mean = jnp.mean(y, axis=-2, keepdims=True)  # (B, 1, D)
    dist = jnp.linalg.norm(y - mean, axis=-1)  # (B, T)
    scale = jnp.linalg.norm(mean, axis=-1)  # (B, 1)
    ratio = jnp.where(scale > 0, dist / jnp.where(scale > 0, scale, 1.0), jnp.where(dist > 0, jnp.inf, 0.0))
    return jnp.mean(ratio)


def zero_token_fraction(x: jax.Array) -> jax.Array:
    """Share of tokens x (B, T, D) whose D values are all exactly zero."""
    return jnp.mean(jnp.all(x == 0, axis=-1))


def dead_unit_fraction(activation: jax.Array) -> jax.Array:
    """Share of units of ReLU activations (N, U) that are zero on every one of the N rows."""
    return jnp.mean(jnp.all(activation <= 0, axis=0))


def entropy_maxima(config: NetworkConfig, num_tokens: int, capacity: int | None) -> tuple[float | None, float | None]:
    """The largest possible dispatch and combine entropy (nats) of the layer's routing statistics (ROUTING_KEYS),
    None where the statistic is identically 0 (a dense layer, the combine of top-1)."""
    def log_or_none(n: float) -> float | None:
        return math.log(n) if n > 1 else None

    e = config.num_experts
    if config.moe == "softmoe":  # dispatch: per slot over T tokens; combine: per token over E*S slots
        return log_or_none(num_tokens), log_or_none(e * capacity)
    if config.moe == "topk":  # router distribution over E; combine over the k kept choices
        return log_or_none(e), log_or_none(config.k)
    if config.moe == "expert_choice":  # router distribution over E; combine over the experts that took the token
        return log_or_none(e), log_or_none(e)
    return None, None


def _only(collection: Mapping[str, Any], suffix: str) -> jax.Array | None:
    """The single sown value whose flattened name ends with suffix (None if there is none)."""
    leaves = jax.tree_util.tree_flatten_with_path(collection, is_leaf=lambda v: isinstance(v, tuple))[0]
    found = [v for path, v in leaves if ".".join(str(getattr(k, "key", k)) for k in path).endswith(suffix)]
    return found[0][0] if found else None


def network_diagnostics(network: Network, params: Any, obs: jax.Array, key: jax.Array) -> dict[str, Any]:
    """METRICS of one network's penultimate layer on a batch of observations (B, *obs); jit-able. Entries that do
    not apply are None. key serves a Soft MoE that redraws Phi on every call."""
    cfg = network.config
    out, found = network.apply(params, obs, mutable=[ACTIVATIONS, FEATURES, TOKENS, "routing"], rngs={"phi": key})
    result: dict[str, Any] = dict.fromkeys(METRICS)
    result["q_state_sensitivity"] = state_sensitivity(out.q_values)
    features = _only(found.get(FEATURES, {}), "penultimate_features")
    if features is None:  # moe="none" sows no penultimate features: the head reads the flattened feature map
        features = _only(found.get(ACTIVATIONS, {}), RELU_SUFFIX).reshape(obs.shape[0], -1)
    result["feature_state_sensitivity"] = state_sensitivity(features)
    result["feature_srank"] = srank(features.reshape(obs.shape[0], -1))
    if cfg.moe == "none":
        return result
    tokens_in = _only(found.get(TOKENS, {}), "layer_input")
    if tokens_in.shape[-2] > 1:
        result["zero_token_fraction"] = zero_token_fraction(tokens_in)
        result["token_spread"] = token_spread(_only(found.get(TOKENS, {}), "layer_output"))
    hidden = [v[0] for path, v in jax.tree_util.tree_flatten_with_path(
        found.get(ACTIVATIONS, {}).get("penultimate", {}), is_leaf=lambda v: isinstance(v, tuple))[0]]
    result["dead_expert_units"] = dead_unit_fraction(hidden[0]) if hidden else None
    dispatch_max, combine_max = entropy_maxima(cfg, network.info.token_shape[0], network.info.capacity)
    routing = found.get("routing", {}).get("penultimate", {})
    if dispatch_max is not None:
        result["dispatch_entropy_fraction"] = routing["dispatch_entropy"][0] / dispatch_max
    if combine_max is not None:
        result["combine_entropy_fraction"] = routing["combine_entropy"][0] / combine_max
    return result


def dense_baseline_config(config: NetworkConfig) -> NetworkConfig:
    """The dense penultimate layer (flatten -> Dense(hidden) -> ReLU, the paper's baseline) on the same encoder
    and head as `config`, nothing around it."""
    base = NetworkConfig()
    keep = ("encoder", "encoder_widths", "conv", "hidden", "head", "dueling", "num_atoms", "v_min", "v_max", "noisy",
            "noisy_sigma0", "dtype")
    return dataclasses.replace(base, moe="dense", **{name: getattr(config, name) for name in keep})


def with_encoder(params: Any, encoder_params: Any) -> Any:
    """params {"params": {...}} with their "encoder" part replaced."""
    return {"params": {**params["params"], "encoder": encoder_params}}


def collapse_reasons(layer: Mapping[str, Any], dense: Mapping[str, Any], initial: bool = True) -> list[str]:
    """Why the layer counts as collapsed next to the dense layer on the same encoder and states (empty: it does
    not): its features' srank below COLLAPSE_SRANK_RATIO of the dense layer's, and for networks at
    initialisation (`initial`) its Q sensitivity below COLLAPSE_Q_RATIO of the dense layer's."""
    reasons = []
    rank, rank_dense = layer["feature_srank"], dense["feature_srank"]
    if rank < COLLAPSE_SRANK_RATIO * rank_dense:
        reasons.append(f"its features span {rank:.3g} directions across states against the dense layer's "
                       f"{rank_dense:.3g} (srank; collapsed below {COLLAPSE_SRANK_RATIO:g}x)")
    q, q_dense = layer["q_state_sensitivity"], dense["q_state_sensitivity"]
    if initial and q_dense > 0 and q < COLLAPSE_Q_RATIO * q_dense:
        reasons.append(f"its Q-values vary across states {q / q_dense:.2g}x as much as the dense layer's "
                       f"(collapsed below {COLLAPSE_Q_RATIO:g}x)")
    return reasons


def collapsed(layer: Mapping[str, Any], dense: Mapping[str, Any], initial: bool = True) -> bool:
    """True when collapse_reasons finds any."""
    return bool(collapse_reasons(layer, dense, initial))


def _host(value: Any) -> Any:
    return None if value is None else float(value)


def dense_network(network: Network) -> Network:
    """The dense baseline network (dense_baseline_config) on the same observations and actions."""
    return build_network(dense_baseline_config(network.config), network.obs_shape, network.module.num_actions,
                         network.obs_dtype)


def diagnose_params(network: Network, dense: Network, params: Any, obs: jax.Array,
                    key: jax.Array) -> dict[str, dict[str, Any]]:
    """{"layer": METRICS of the network, "dense_baseline": METRICS of the dense network (dense_network) with the
    same encoder parameters, its own layer and head initialised from key} on observations (B, *obs), as floats or
    None."""
    dense_params = with_encoder(dense.init(key), params["params"]["encoder"])
    layer = jax.device_get(network_diagnostics(network, params, obs, key))
    base = jax.device_get(network_diagnostics(dense, dense_params, obs, key))
    return {"layer": {k: _host(v) for k, v in layer.items()}, "dense_baseline": {k: _host(v) for k, v in base.items()}}


# ------------------------------------------------------------------------------------------- states and targets


def random_states(config: TrainConfig, count: int = DIAGNOSE_STATES, seed: int = 0) -> np.ndarray:
    """`count` observations (count, *obs) of the uniformly random policy on config.env: STATE_ENVS environments
    stepped STATE_STEPS times (episodes restart), drawn without replacement in random order."""
    from moescale.envs.host import is_host_env

    key_run, key_pick = jax.random.split(jax.random.key(seed))
    if is_host_env(config.env):
        obs = _host_random_states(config, seed)
    else:
        obs = _random_collector(config.env, config.sticky_prob, config.max_episode_steps)(key_run)
    if obs.shape[0] < count:
        raise ValueError(f"--states={count}: at most {obs.shape[0]} states are drawn from {config.env}")
    return np.asarray(obs)[np.asarray(jax.random.permutation(key_pick, obs.shape[0]))[:count]]


@functools.lru_cache(maxsize=16)
def _random_collector(name: str, sticky_prob: float | None, max_steps: int | None) -> Any:
    """key -> observations (STATE_ENVS * STATE_STEPS, *obs) of the random policy on a JAX env, compiled once."""
    from moescale.envs import make_env
    from moescale.train.rollout import collect_transitions

    env = make_env(name, sticky_prob, max_steps)

    def act(o: jax.Array, k: jax.Array) -> jax.Array:
        return jax.random.randint(k, (o.shape[0],), 0, env.num_actions, jnp.int32)

    return jax.jit(lambda k: collect_transitions(env, act, k, STATE_ENVS, STATE_STEPS).obs)


def _host_random_states(config: TrainConfig, seed: int) -> np.ndarray:
    from moescale.envs.host import collect_transitions, make_host_env, stack_to_obs

    env = make_host_env(config.env, STATE_ENVS, config.sticky_prob, config.max_episode_steps, seed=seed)
    rng = np.random.default_rng(seed)
    try:
        data = collect_transitions(env, lambda stacks, t: rng.integers(0, env.num_actions, len(stacks)), seed,
                                   STATE_STEPS)
    finally:
        env.close()
    return np.asarray(stack_to_obs(data["obs"], len(env.frame_shape)))


def initial_key(config: TrainConfig, seed: int) -> jax.Array:
    """The key the network of seed `seed` of a new run is initialised from (as the trainer of config.env does)."""
    from moescale.envs.host import is_host_env

    key = jax.random.key(config.seed + seed)
    return jax.random.fold_in(key, 1) if is_host_env(config.env) else jax.random.split(key, 3)[0]


def network_of(config: TrainConfig) -> Network:
    """The value network of a run config, on its environment's observations."""
    from moescale.envs.host import env_spaces

    return build_network(config.network, *env_spaces(config.env, config.sticky_prob, config.max_episode_steps))


def _mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, the mean over seeds (None where it does not apply)."""
    return {k: None if rows[0][k] is None else float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _summarise(config: TrainConfig, per_seed: list[dict[str, Any]], source: dict[str, Any]) -> dict[str, Any]:
    layer, dense = _mean([p["layer"] for p in per_seed]), _mean([p["dense_baseline"] for p in per_seed])
    net = config.network
    initial = source["source"] == "initialisation"
    rule = f"feature_srank below {COLLAPSE_SRANK_RATIO:g} x the dense baseline's"
    if initial:
        rule += f", or q_state_sensitivity below {COLLAPSE_Q_RATIO:g} x the dense baseline's"
    return {"layer": layer, "dense_baseline": dense, "collapsed": collapsed(layer, dense, initial),
            "collapse_reasons": collapse_reasons(layer, dense, initial), "collapse_rule": rule,
            "env": config.env, "preset": config.preset, "moe": net.moe,
            "size": net.width_multiplier if net.moe == "dense" else net.num_experts,
            "network": net.to_dict(), **source, "per_seed": per_seed, "device": jax.devices()[0].device_kind}


def diagnose_config(config: TrainConfig, states: int = DIAGNOSE_STATES) -> dict[str, Any]:
    """Diagnostics of a new run's networks at initialisation (each of its seeds as train would start it), on
    `states` states of the uniformly random policy (the same states for every seed)."""
    network = network_of(config)
    dense = dense_network(network)
    obs = jnp.asarray(random_states(config, states, config.seed))
    per_seed = []
    for s in range(config.seeds):
        key = initial_key(config, s)
        per_seed.append({"seed": s, **diagnose_params(network, dense, network.init(key), obs, key)})
    return _summarise(config, per_seed, {"source": "initialisation", "run": None, "agent_steps": 0,
                                         "states": states, "state_policy": "uniformly random"})


def diagnose_run(run_dir: Path, states: int = DIAGNOSE_STATES) -> dict[str, Any]:
    """Diagnostics of every seed's newest saved parameters in a run directory, each on `states` states of its own
    policy (epsilon-greedy at the final training epsilon) on environments no training step used."""
    from moescale.analysis.analyze import held_out_batch, load_run, saved_params, seed_params

    parts = load_run(Path(run_dir))
    iteration, stacked = saved_params(parts)[-1]
    cfg = parts.config
    dense = dense_network(parts.network)
    per_seed = []
    for s in range(cfg.seeds):
        params = seed_params(stacked, s)
        obs = held_out_batch(parts, params, s, states).obs
        per_seed.append({"seed": s, **diagnose_params(parts.network, dense, params, obs, initial_key(cfg, s))})
    return _summarise(cfg, per_seed, {"source": "run", "run": str(run_dir), "iteration": iteration,
                                      "agent_steps": min(iteration * cfg.iteration_steps, cfg.steps),
                                      "states": states,
                                      "state_policy": f"each seed's own, epsilon {cfg.agent.eps_end:g}"})


LABELS = {"dispatch_entropy_fraction": "dispatch entropy / max", "combine_entropy_fraction": "combine entropy / max",
          "zero_token_fraction": "zero input tokens", "token_spread": "output token spread",
          "dead_expert_units": "dead hidden units", "feature_state_sensitivity": "feature state sensitivity",
          "q_state_sensitivity": "Q state sensitivity", "feature_srank": "feature srank"}


def describe(found: Mapping[str, Any]) -> str:
    """One line naming what was diagnosed: env, preset, layer, where the parameters and states come from."""
    net = found["network"]
    layer = {"dense": f"dense x{found['size']}", "none": "no penultimate layer"}.get(
        found["moe"], f"{found['moe']}-{found['size']}")
    extras = [name for name in ("residual", "pre_norm", "normalize") if net.get(name)]
    if net.get("tokenizer") and net["tokenizer"] != "per_conv":
        extras.append(f"tokenizer {net['tokenizer']}")
    if net.get("phi_scale", 1.0) != 1.0:
        extras.append(f"phi_scale {net['phi_scale']:g}")
    where = ("at initialisation" if found["source"] == "initialisation"
             else f"{found['run']} at {found['agent_steps']:,} agent steps")
    return (f"{found['env']}, {found['preset']}, {layer}{' + ' + ', '.join(extras) if extras else ''}, {where}; "
            f"{found['states']} states ({found['state_policy']} policy), mean over {len(found['per_seed'])} seed(s)")


def format_diagnosis(found: Mapping[str, Any]) -> str:
    """The diagnosis as a table: each metric for the layer and the dense baseline, then the verdict."""
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [describe(found), "", f"{'':<28}{'layer':>10}{'dense':>10}"]
    for key in METRICS:
        lines.append(f"{LABELS[key]:<28}{cell(found['layer'][key]):>10}{cell(found['dense_baseline'][key]):>10}")
    if found["collapsed"]:
        lines += ["", "COLLAPSED: " + "; ".join(found["collapse_reasons"]), f"remedies: {REMEDY_HINT}"]
    else:
        lines += ["", f"not collapsed ({found['collapse_rule']})"]
    return "\n".join(lines)


REMEDY_HINT = ("--set network.residual=true (tokens + layer(tokens)), or network.pre_norm=true (LayerNorm before the "
               "layer) with network.phi_scale=10 (sharper routing); README: Collapse diagnostics")


def collapse_warning(config: TrainConfig) -> str | None:
    """One line when the MoE layer of a new run's first seed is collapsed at initialisation (None otherwise, and
    for layers without routing)."""
    if config.network.moe not in MOE_LAYERS:
        return None
    found = diagnose_config(dataclasses.replace(config, seeds=1))
    if not found["collapsed"]:
        return None
    return (f"warning: this {config.network.moe} layer is collapsed at initialisation: "
            f"{'; '.join(found['collapse_reasons'])}. Whether training lifts it shows in `moescale diagnose RUN_DIR` "
            f"(the paper's Soft MoE on MinAtar stays collapsed and learns below the dense layer, BENCHMARKS.md); "
            f"remedies: {REMEDY_HINT}")


def write_diagnosis(found: Mapping[str, Any], out: Path, name: str = "diagnose.json") -> Path:
    """Write found to out/name (atomically) and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(found, indent=2))
    tmp.replace(path)
    return path
