"""Activation probes for analysis: layers sow what the analysis needs, at no cost unless asked for.

Two flax collections, each filled only when the caller makes it mutable:
  "activations"  the output of every ReLU layer (the encoder's conv or dense layers, for Impala the final
                 ReLU of its residual stream; the dense or expert hidden layer) as (N, units): N counts
                 everything a unit is averaged over (batch, spatial positions, tokens or slots), units its
                 neurons (conv channels, hidden units; for experts, expert x hidden unit). Dormant-neuron
                 fractions are computed from these.
  "features"     the penultimate features the head reads, (B..., F), for srank and feature norms.
  "tokens"       the tokens going into the penultimate layer ("layer_input", the tokenizer's output) and those
                 the head aggregates ("layer_output", after any residual), (B..., T, D), for the collapse
                 diagnostics (moescale.analysis.diagnose).
"""

from __future__ import annotations

import flax.linen as nn
import jax

ACTIVATIONS = "activations"
FEATURES = "features"
TOKENS = "tokens"
RELU_SUFFIX = "_relu"


def _asked(module: nn.Module, collection: str) -> bool:
    # init() makes every collection mutable; probes belong to forward passes that ask for them.
    return module.is_mutable_collection(collection) and not module.is_initializing()


def sow_activation(module: nn.Module, name: str, x: jax.Array, units: int | None = None) -> None:
    """Record a ReLU output with its neurons on the last axis (or the last `units` values, flattened)."""
    if _asked(module, ACTIVATIONS):
        width = x.shape[-1] if units is None else units
        # The suffix keeps the sown name apart from a submodule's name (flax scopes share one namespace).
        module.sow(ACTIVATIONS, name + RELU_SUFFIX, x.reshape(-1, width))


def sow_features(module: nn.Module, x: jax.Array) -> None:
    """Record the penultimate features (B..., F)."""
    if _asked(module, FEATURES):
        module.sow(FEATURES, "penultimate_features", x)


def sow_tokens(module: nn.Module, name: str, x: jax.Array) -> None:
    """Record tokens (B..., T, D) at the penultimate layer under `name` ("layer_input" or "layer_output")."""
    if _asked(module, TOKENS):
        module.sow(TOKENS, name, x)
