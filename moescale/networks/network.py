"""build_network(config, obs_shape, num_actions): encoder -> tokenizer -> penultimate -> aggregation -> head.

Axes: B batch (any leading axes), h/w/c feature map, T tokens, D token dim, A actions, N atoms.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moescale.config import NetworkConfig
from moescale.layers import Tokenizer, aggregate, token_shape
from moescale.layers.probes import sow_features, sow_tokens
from moescale.networks.encoders import encoder_from_config
from moescale.networks.heads import HeadOutput, QHead
from moescale.networks.penultimate import PenultimateLayer, penultimate_layer

PARTS = ("encoder", "tokenizer", "penultimate", "head")
# Parameters around the penultimate layer (penultimate_tokens), counted as part of it.
AROUND_PENULTIMATE = ("pre_norm",)


def _dtype(config: NetworkConfig) -> Any:
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def make_penultimate(config: NetworkConfig) -> nn.Module:
    """The configured penultimate layer's flax module, named "penultimate" (moe="none" has none: ValueError)."""
    layer = penultimate_layer(config)
    if layer is None:
        raise ValueError(f"moe={config.moe!r}: has no penultimate layer")
    return layer.module(_dtype(config), "penultimate")


def penultimate_tokens(config: NetworkConfig, tokens: jax.Array, deterministic: bool) -> jax.Array:
    """Tokens (B..., T, D) through the configured layer and what surrounds it; call inside a compact method.

    With both options on, y = x + layer(LayerNorm(x)) as in vmoe's blocks: pre_norm normalizes each token over D
    before the layer, residual adds the tokens back to the layer's output."""
    h = (nn.LayerNorm(dtype=_dtype(config), param_dtype=jnp.float32, name="pre_norm")(tokens) if config.pre_norm
         else tokens)
    layer = penultimate_layer(config)
    module = layer.module(_dtype(config), "penultimate")
    y = module(h, deterministic) if layer.takes_deterministic else module(h)
    return tokens + y if config.residual else y


class QNetwork(nn.Module):
    """Observations (B..., *obs) -> HeadOutput(q_values (B..., A), logits (B..., A, N) or None).

    Sows each MoE layer's auxiliary loss into "aux_loss" and, when "routing" is mutable, its routing
    statistics; when "activations" / "features" / "tokens" are mutable, the ReLU layers' outputs, the penultimate
    features and the tokens in and out of the penultimate layer (moescale.layers.probes). deterministic=False turns
    on noisy-net noise (rng "noise") and router noise ("router"); a Soft MoE with random_phi in "redraw" mode needs
    the rng "phi" in every call.
    """

    config: NetworkConfig
    num_actions: int

    @nn.compact
    def __call__(self, obs: jax.Array, deterministic: bool = True) -> HeadOutput:
        cfg = self.config
        fmap = encoder_from_config(cfg, name="encoder")(obs)  # (B..., h, w, c)
        if cfg.moe == "none":  # Dopamine's MinAtar network: the feature map flattened into the head
            features = fmap.reshape(*fmap.shape[:-3], -1)  # (B..., h*w*c)
        else:
            tokens = Tokenizer(cfg.token_kind, cfg.patch_size, cfg.patch_dim, dtype=_dtype(cfg),
                               name="tokenizer")(fmap)  # (B..., T, D)
            sow_tokens(self, "layer_input", tokens)
            tokens = penultimate_tokens(cfg, tokens, deterministic)
            sow_tokens(self, "layer_output", tokens)
            features = aggregate(tokens, cfg.aggregation)  # (B..., F)
        sow_features(self, features)
        head = QHead(self.num_actions, cfg.dueling, cfg.num_atoms if cfg.head == "c51" else None,
                     cfg.v_min, cfg.v_max, cfg.noisy, cfg.noisy_sigma0, dtype=_dtype(cfg), name="head")
        out = head(features, deterministic=deterministic)
        # Q-values leave the network in float32 whatever the compute dtype: TD targets need the precision.
        return jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), out)


@dataclasses.dataclass(frozen=True)
class NetworkInfo:
    """What build_network measured: shapes, capacity, parameter counts and forward FLOPs."""

    feature_shape: tuple[int, int, int]
    token_shape: tuple[int, int]
    capacity: int | None  # slots per expert (softmoe) or tokens per expert (topk, expert_choice)
    params: dict[str, int]  # encoder, tokenizer, penultimate, head, total, active_per_token
    forward_flops: float  # per example, from XLA's cost analysis of the compiled forward pass

    def summary(self) -> str:
        """Human-readable multi-line description."""
        p = self.params
        lines = [f"feature map {self.feature_shape} -> tokens {self.token_shape} (T, D)"]
        if self.capacity is not None:
            lines.append(f"capacity per expert: {self.capacity}")
        lines.append("params: " + ", ".join(f"{k} {v:,}" for k, v in p.items()))
        lines.append(f"forward FLOPs per example: {self.forward_flops:,.0f}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Network:
    """A built value network: the flax module plus its config, input spec and info."""

    module: QNetwork
    config: NetworkConfig
    obs_shape: tuple[int, ...]
    obs_dtype: Any
    info: NetworkInfo

    @property
    def layer(self) -> PenultimateLayer | None:
        """The penultimate layer as built from the config (None for moe="none")."""
        return penultimate_layer(self.config)

    def init(self, key: jax.Array) -> dict:
        """Parameters {"params": ...} for one network (sown collections are dropped)."""
        return {"params": _jitted_init(self.module, self.obs_shape, self.obs_dtype)(key)["params"]}

    def apply(self, params: dict, obs: jax.Array, **kwargs: Any) -> Any:
        """QNetwork.apply on observations (B..., *obs_shape)."""
        return self.module.apply(params, obs, **kwargs)


@functools.lru_cache(maxsize=64)
def _jitted_init(module: QNetwork, obs_shape: tuple[int, ...], obs_dtype: Any) -> Any:
    # One compiled program per network, reused for every seed: eager init would compile each initializer op
    # on its own, several times slower on CPU. The dummy input is a NumPy constant: a jnp array made while an
    # outer jit traces (a vmapped or jitted agent init) would be that trace's tracer, kept here past its trace.
    dummy = np.zeros((1, *obs_shape), obs_dtype)
    return jax.jit(lambda key: module.init(key, dummy))


def _count(tree: Any) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def param_counts(config: NetworkConfig, params: dict, num_tokens: int, capacity: int | None = None
                 ) -> dict[str, int]:
    """Parameters per part, total, and those applied to one token's representation at the penultimate
    layer (active_per_token, as the layer counts them: all of it for dense and Soft MoE, whose slots mix every
    token; router + k experts for top-k; router + the expected E*C/T experts for expert choice; plus the
    parameters around the layer, which count as penultimate: the pre_norm LayerNorm). capacity: unused, the
    layer knows its own."""
    tree = params["params"]
    counts = {part: _count(tree.get(part, {})) for part in PARTS}
    around = sum(_count(tree.get(part, {})) for part in AROUND_PENULTIMATE)
    counts["penultimate"] += around
    counts["total"] = _count(tree)
    layer = penultimate_layer(config)
    counts["active_per_token"] = 0 if layer is None else around + layer.active_per_token(
        tree.get("penultimate", {}), num_tokens)
    return counts


def build_network(config: NetworkConfig, obs_shape: tuple[int, ...], num_actions: int,
                  obs_dtype: Any = jnp.float32, flops: bool = True) -> Network:
    """Compose the value network and measure it; bad shapes raise ValueError before any training trace.
    flops=False leaves info.forward_flops NaN and skips its compile (a plan that only counts parameters)."""
    if isinstance(num_actions, bool) or not isinstance(num_actions, int) or num_actions < 1:
        raise ValueError(f"num_actions={num_actions!r}: must be a positive int")
    obs_shape = tuple(int(s) for s in obs_shape)
    module = QNetwork(config, num_actions)
    dummy = jax.ShapeDtypeStruct((1, *obs_shape), obs_dtype)
    encoder = encoder_from_config(config)
    fmap = jax.eval_shape(lambda x: encoder.init_with_output(jax.random.key(0), x)[0], dummy)
    if len(fmap.shape) != 4:
        raise ValueError(f"obs_shape={obs_shape}: encoder {config.encoder!r} gave features {fmap.shape[1:]}")
    feature_shape = tuple(fmap.shape[1:])
    tokens = token_shape(config.token_kind, feature_shape, config.patch_size, config.patch_dim)
    layer = penultimate_layer(config)
    capacity = None if layer is None else layer.capacity(tokens[0])
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), dummy)
    params = {"params": variables["params"]}
    forward_flops = _forward_flops(module, params, dummy) if flops else math.nan
    info = NetworkInfo(feature_shape, tokens, capacity, param_counts(config, params, tokens[0], capacity),
                       forward_flops)
    return Network(module, config, obs_shape, obs_dtype, info)


def _forward_flops(module: QNetwork, params: Any, dummy: jax.ShapeDtypeStruct) -> float:
    """FLOPs of one deterministic forward pass on one example, as XLA counts them."""
    # The "phi" stream serves a Soft MoE that redraws Phi on every call (random_phi); other layers ignore it.
    forward = jax.jit(lambda p, x: module.apply(p, x, rngs={"phi": jax.random.key(0)}))
    cost = forward.lower(params, dummy).cost_analysis()
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


ENCODER_WORDS = {"nature": "Nature CNN (32-64-64)", "impala": "Impala CNN (16-32-32)", "minatar": "Conv(16, 3x3)",
                 "mlp": "MLP"}


def describe_network(config: NetworkConfig) -> str:
    """The network a config builds, in one line: encoder -> penultimate layer -> head."""
    enc = ENCODER_WORDS[config.encoder]
    if config.encoder_widths is not None:
        widths = "-".join(str(w) for w in config.encoder_widths)
        enc = {"minatar": f"Conv({widths}, 3x3)", "mlp": f"MLP({widths})", "impala": f"Impala CNN ({widths})"}.get(
            config.encoder, enc)
    if config.moe == "none":
        layer = "flatten"
    elif config.moe == "dense" and config.token_kind == "per_sample":
        layer = f"flatten -> Dense({config.hidden * config.width_multiplier}) -> ReLU"
    else:
        name = {"dense": "token-wise MLP", "softmoe": f"Soft MoE-{config.num_experts}",
                "topk": f"Top-{config.k} MoE-{config.num_experts}",
                "expert_choice": f"Expert-choice MoE-{config.num_experts}"}[config.moe]
        around = [w for w, on in (("residual", config.residual), ("pre-norm", config.pre_norm)) if on]
        layer = (f"{config.token_kind} tokens -> {name}{' (' + ', '.join(around) + ')' if around else ''}"
                 f" -> {config.aggregation}")
    head = f"C51 head ({config.num_atoms} atoms)" if config.head == "c51" else "Q head"
    head = " ".join(w for w, on in (("noisy", config.noisy), ("dueling", config.dueling)) if on) + (
        " " if config.noisy or config.dueling else "") + head
    return f"{enc} -> {layer} -> {head}"
