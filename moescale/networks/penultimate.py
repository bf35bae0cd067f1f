"""Penultimate layers as the network builds them from its config, one class per registered name.

A layer maps tokens (..., T, D) to tokens (..., T, D') (D' = D for every MoE layer; the dense baseline on one
flattened token maps it to its width). To add one, subclass PenultimateLayer, implement `module`, and register
it (moescale.register_layer): network.moe then takes its name, and build_network, the parameter counts, the
agents and every command use it. Axes: T tokens, D token dim, E experts.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax

from moescale.config import NetworkConfig
from moescale.layers import (
    DenseMLP,
    ExpertChoiceMoE,
    SoftMoE,
    TopKMoE,
    expert_choice_capacity,
    soft_moe_slots,
    topk_capacity,
)
from moescale.registry import lookup, register_layer


def _count(tree: Any) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


class PenultimateLayer:
    """A penultimate layer built from the network config.

    scales_with: what `--experts` sets for it, "experts" (network.num_experts) or "width"
    (network.width_multiplier). takes_deterministic: the module is called as module(tokens, deterministic),
    deterministic=False when the agent acts or learns with noise.
    """

    scales_with = "experts"
    takes_deterministic = False

    def __init__(self, config: NetworkConfig):
        self.config = config

    def module(self, dtype: Any, name: str) -> nn.Module:
        """The flax module, tokens (..., T, D) -> (..., T, D'), named `name`."""
        raise NotImplementedError(f"{type(self).__name__}.module: a penultimate layer builds its flax module")

    def capacity(self, num_tokens: int) -> int | None:
        """Slots or tokens per expert for inputs of num_tokens tokens (None: the layer has no capacity)."""
        return None

    def active_per_token(self, params: Any, num_tokens: int) -> int:
        """Parameters applied to one token's representation (params: the layer's own); all of them by default."""
        return _count(params)

    def stochastic(self) -> bool:
        """True when the layer draws noise (rng stream "router") while acting or learning."""
        return False

    def redraws_every_call(self) -> bool:
        """True when every forward pass draws part of the layer afresh (rng stream "phi"), evaluation included."""
        return False


def penultimate_layer(config: NetworkConfig) -> PenultimateLayer | None:
    """The registered layer config.moe names, built from config (None for moe="none")."""
    return None if config.moe == "none" else lookup("layer", config.moe)(config)


@register_layer("dense")
class Dense(PenultimateLayer):
    """The paper's baseline Dense(hidden x width_multiplier) -> ReLU on the flattened token, or one MLP shared by
    all tokens (Sokar et al. 2025) with another tokenizer."""

    scales_with = "width"

    def module(self, dtype: Any, name: str) -> nn.Module:
        c = self.config
        return DenseMLP(c.hidden, c.width_multiplier, project=c.token_kind != "per_sample", dtype=dtype, name=name)


@register_layer("softmoe")
class Soft(PenultimateLayer):
    """Soft MoE (Puigcerver et al. 2024)."""

    def module(self, dtype: Any, name: str) -> nn.Module:
        c = self.config
        return SoftMoE(c.num_experts, c.slots_per_expert, c.capacity_factor, c.hidden, c.normalize, c.random_phi,
                       phi_init=c.phi_init, phi_scale=c.phi_scale, random_phi_mode=c.random_phi_mode, dtype=dtype,
                       name=name)

    def capacity(self, num_tokens: int) -> int:
        c = self.config
        return c.slots_per_expert or soft_moe_slots(num_tokens, c.num_experts, c.capacity_factor)

    def redraws_every_call(self) -> bool:
        return self.config.random_phi and self.config.random_phi_mode == "redraw"


@register_layer("topk")
class TopK(PenultimateLayer):
    """Token-choice top-k MoE (Switch / GShard; Dopamine's Top-1 router)."""

    takes_deterministic = True

    def module(self, dtype: Any, name: str) -> nn.Module:
        c = self.config
        return TopKMoE(c.num_experts, c.k, c.capacity_factor, c.hidden, c.router_noise, c.aux_loss,
                       router_init=c.router_init, router_noise_scale=c.router_noise_scale,
                       capacity_times_k=c.capacity_times_k, dtype=dtype, name=name)

    def capacity(self, num_tokens: int) -> int:
        c = self.config
        return topk_capacity(num_tokens, c.num_experts, c.k if c.capacity_times_k else 1, c.capacity_factor)

    def active_per_token(self, params: Any, num_tokens: int) -> int:
        # the router and k of the experts
        per_expert = _count(params["experts"]) / self.config.num_experts
        return round(_count(params["router"]) + self.config.k * per_expert)

    def stochastic(self) -> bool:
        return self.config.router_noise > 0


@register_layer("expert_choice")
class ExpertChoice(PenultimateLayer):
    """Expert-choice MoE (Zhou et al. 2022)."""

    def module(self, dtype: Any, name: str) -> nn.Module:
        c = self.config
        return ExpertChoiceMoE(c.num_experts, c.capacity_factor, c.hidden, router_init=c.router_init, dtype=dtype,
                               name=name)

    def capacity(self, num_tokens: int) -> int:
        return expert_choice_capacity(num_tokens, self.config.num_experts, self.config.capacity_factor)

    def active_per_token(self, params: Any, num_tokens: int) -> int:
        # the router and the expected E * C / T experts a token is picked by
        e = self.config.num_experts
        per_expert = _count(params["experts"]) / e
        return round(_count(params["router"]) + e * self.capacity(num_tokens) / num_tokens * per_expert)
