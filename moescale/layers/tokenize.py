"""Turn an encoder feature map into tokens, and tokens back into one vector.

Axes: h, w spatial, c channels, T tokens, D token dim, P patch size, F flat features.
Leading batch axes are written `...`.

Tokenizers (Obando-Ceron et al. 2024, Sokar et al. 2025):
    per_conv     h*w tokens of dim c (the default; best for Soft MoE)
    per_feature  c tokens of dim h*w
    per_sample   1 token of dim h*w*c
    per_patch    (h/P)*(w/P) non-overlapping P x P patches, each projected to dim patch_dim
Aggregations: flatten (the paper's default), mean, sum.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moescale import checks
from moescale.layers.dense import xavier_dense

TOKENIZERS = ("per_conv", "per_feature", "per_sample", "per_patch")
AGGREGATIONS = ("flatten", "mean", "sum")


def token_shape(kind: str, feature_shape: tuple[int, int, int], patch_size: int = 1,
                patch_dim: int | None = None) -> tuple[int, int]:
    """(T, D) a tokenizer produces from a (h, w, c) feature map; raises ValueError on bad settings."""
    checks.choice("tokenizer", kind, TOKENIZERS)
    h, w, c = feature_shape
    if kind == "per_conv":
        return h * w, c
    if kind == "per_feature":
        return c, h * w
    if kind == "per_sample":
        return 1, h * w * c
    checks.positive_int("patch_size", patch_size)
    checks.optional_positive_int("patch_dim", patch_dim)
    if h % patch_size or w % patch_size:
        checks.fail("patch_size", patch_size, f"must divide the feature map's height and width, {h}x{w}")
    return (h // patch_size) * (w // patch_size), patch_dim or c


class Tokenizer(nn.Module):
    """Feature map (..., h, w, c) -> tokens (..., T, D); per_patch has a learned projection."""

    kind: str = "per_conv"
    patch_size: int = 1
    patch_dim: int | None = None  # per_patch only; None keeps c
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        checks.choice("tokenizer", self.kind, TOKENIZERS)
        checks.positive_int("patch_size", self.patch_size)
        checks.optional_positive_int("patch_dim", self.patch_dim)
        super().__post_init__()

    @nn.compact
    def __call__(self, fmap: jax.Array) -> jax.Array:
        lead, (h, w, c) = fmap.shape[:-3], fmap.shape[-3:]
        t, d = token_shape(self.kind, (h, w, c), self.patch_size, self.patch_dim)
        if self.kind == "per_conv":
            return fmap.reshape(*lead, t, d)
        if self.kind == "per_feature":
            return jnp.swapaxes(fmap.reshape(*lead, h * w, c), -1, -2)  # (..., c, h*w)
        if self.kind == "per_sample":
            return fmap.reshape(*lead, 1, d)
        p = self.patch_size
        x = fmap.reshape(*lead, h // p, p, w // p, p, c)
        x = jnp.moveaxis(x, -4, -3).reshape(*lead, t, p * p * c)  # patch rows in (row, col, channel) order
        return xavier_dense(d, self.dtype, "patch_proj", self.param_dtype)(x)


def aggregate(tokens: jax.Array, kind: str = "flatten") -> jax.Array:
    """Tokens (..., T, D) -> one vector: flatten (..., T*D), mean (..., D) or sum (..., D)."""
    checks.choice("aggregation", kind, AGGREGATIONS)
    if kind == "flatten":
        return tokens.reshape(*tokens.shape[:-2], -1)
    if kind == "mean":
        return jnp.mean(tokens, axis=-2)
    return jnp.sum(tokens, axis=-2)
