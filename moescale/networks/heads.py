"""Value heads on a feature vector: plain, dueling, distributional (C51) and noisy Q heads.

Axes:
  B  batch (any number of leading dims, including none)
  F  input features
  A  actions
  N  atoms of the C51 support
  O  output features of one NoisyDense layer (A, A*N, 1 or N in a head)

Rainbow's head (Hessel et al. 2018) is QHead(dueling=True, num_atoms=51, noisy=True); DQN's is QHead().
Heads are single layers per stream: the hidden (penultimate) layer, dense or MoE, lives in the network.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moescale import checks
from moescale.layers.dense import xavier_dense

Dtype = Any



def _check_num_atoms(num_atoms: Any) -> None:
    if num_atoms is not None and not (checks.is_int(num_atoms) and num_atoms >= 2):
        checks.fail("num_atoms", num_atoms, "must be None (no C51) or an int >= 2")


def _check_support_range(v_min: Any, v_max: Any) -> None:
    # `not (a < b)` also rejects NaN.
    if not (v_min < v_max):
        checks.fail("v_min", v_min, f"must be < v_max={v_max!r}")


def support(num_atoms: int, v_min: float, v_max: float) -> jax.Array:
    """C51 atom values z_i = linspace(v_min, v_max, N) (Bellemare et al. 2017, section 4): shape (N,)."""
    _check_num_atoms(num_atoms)
    if num_atoms is None:
        raise ValueError("num_atoms=None: support needs an int >= 2")
    _check_support_range(v_min, v_max)
    return jnp.linspace(v_min, v_max, num_atoms, dtype=jnp.float32)


def _noise_scale(x: jax.Array) -> jax.Array:
    """f(x) = sign(x) sqrt(|x|) (Fortunato et al. 2018, section 3, factorised noise)."""
    return jnp.sign(x) * jnp.sqrt(jnp.abs(x))


def factorised_noise(key: jax.Array, in_features: int, out_features: int) -> tuple[jax.Array, jax.Array]:
    """Factorised Gaussian noise (Fortunato et al. 2018, section 3): returns eps_w (F, O) and eps_b (O,).

    eps_w = f(eps_in) f(eps_out)^T and eps_b = f(eps_out), with eps_in ~ N(0, I_F), eps_out ~ N(0, I_O) drawn
    from the two halves of jax.random.split(key).
    """
    key_in, key_out = jax.random.split(key)
    f_in = _noise_scale(jax.random.normal(key_in, (in_features,), jnp.float32))  # (F,)
    f_out = _noise_scale(jax.random.normal(key_out, (out_features,), jnp.float32))  # (O,)
    return jnp.outer(f_in, f_out), f_out


def _symmetric_uniform(bound: float) -> nn.initializers.Initializer:
    """U(-bound, bound); Flax's `uniform` is one-sided, [0, scale)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class NoisyDense(nn.Module):
    """Factorised Gaussian noisy linear layer (Fortunato et al. 2018, section 3): (B..., F) -> (B..., O).

    y = x (mu_w + sigma_w * eps_w) + mu_b + sigma_b * eps_b, with one noise draw per call shared by the whole
    batch. Init (section 3.2, factorised case): mu ~ U(-1/sqrt(F), 1/sqrt(F)), sigma = sigma0 / sqrt(F).
    Noise comes from the rng stream "noise"; with deterministic=True only the means are used.
    """

    features: int
    sigma0: float = 0.5
    deterministic: bool | None = None
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        checks.positive_int("features", self.features)
        checks.positive_number("sigma0", self.sigma0)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """(B..., F) -> (B..., O); `deterministic` here or as a field (exactly one of the two)."""
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if x.ndim < 1:
            raise ValueError(f"NoisyDense: inputs must have shape (..., F), got shape {x.shape}")
        in_features = x.shape[-1]
        bound = 1.0 / math.sqrt(in_features)
        shape_w, shape_b = (in_features, self.features), (self.features,)
        mu_w = self.param("mu_w", _symmetric_uniform(bound), shape_w, jnp.float32)  # (F, O)
        mu_b = self.param("mu_b", _symmetric_uniform(bound), shape_b, jnp.float32)  # (O,)
        sigma_init = nn.initializers.constant(self.sigma0 * bound)
        sigma_w = self.param("sigma_w", sigma_init, shape_w, jnp.float32)  # (F, O)
        sigma_b = self.param("sigma_b", sigma_init, shape_b, jnp.float32)  # (O,)
        if deterministic:
            w, b = mu_w, mu_b
        else:
            eps_w, eps_b = factorised_noise(self.make_rng("noise"), in_features, self.features)
            # The noisy weights are built in float32 (params' dtype), then cast for the matmul.
            w, b = mu_w + sigma_w * eps_w, mu_b + sigma_b * eps_b
        x = x.astype(self.dtype)
        return x @ w.astype(self.dtype) + b.astype(self.dtype)


@flax.struct.dataclass
class HeadOutput:
    """What a Q head returns: q_values (B..., A) and, for C51, logits (B..., A, N) (else None)."""

    q_values: jax.Array
    logits: jax.Array | None = None


class QHead(nn.Module):
    """Q head (B..., F) -> HeadOutput: dueling (Wang et al. 2016), C51 (Bellemare et al. 2017), noisy."""

    num_actions: int
    dueling: bool = False
    num_atoms: int | None = None
    v_min: float = -10.0
    v_max: float = 10.0
    noisy: bool = False
    sigma0: float = 0.5
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        checks.positive_int("num_actions", self.num_actions)
        _check_num_atoms(self.num_atoms)
        _check_support_range(self.v_min, self.v_max)
        checks.positive_number("sigma0", self.sigma0)
        super().__post_init__()

    def _stream(self, x: jax.Array, out: int, name: str, deterministic: bool) -> jax.Array:
        """One linear stream (B..., F) -> (B..., out): NoisyDense when noisy, else Xavier-uniform Dense."""
        if self.noisy:
            return NoisyDense(out, self.sigma0, dtype=self.dtype, name=name)(x, deterministic=deterministic)
        return xavier_dense(out, self.dtype, name)(x)

    @nn.compact
    def __call__(self, features: jax.Array, deterministic: bool = True) -> HeadOutput:
        """(B..., F) -> HeadOutput(q_values (B..., A), logits (B..., A, N) or None)."""
        if features.ndim < 1:
            raise ValueError(f"QHead: features must have shape (..., F), got shape {features.shape}")
        num_actions, lead = self.num_actions, features.shape[:-1]
        # Without C51 each action has one output; treat it as a single "atom" so both cases share the code.
        atoms = 1 if self.num_atoms is None else self.num_atoms
        if self.dueling:
            value = self._stream(features, atoms, "value", deterministic)  # (B..., N)
            adv = self._stream(features, num_actions * atoms, "advantage", deterministic)  # (B..., A*N)
            value = value.reshape((*lead, 1, atoms))  # (B..., 1, N)
            adv = adv.reshape((*lead, num_actions, atoms))  # (B..., A, N)
            # Wang et al. 2016, eq. 9: subtracting the mean advantage makes V and A identifiable.
            out = value + adv - jnp.mean(adv, axis=-2, keepdims=True)  # (B..., A, N)
        else:
            out = self._stream(features, num_actions * atoms, "q", deterministic)  # (B..., A*N)
            out = out.reshape((*lead, num_actions, atoms))  # (B..., A, N)
        # Losses (TD, categorical cross-entropy) should see float32 whatever the computation dtype was.
        out = out.astype(jnp.float32)
        if self.num_atoms is None:
            return HeadOutput(q_values=out[..., 0], logits=None)
        z = support(self.num_atoms, self.v_min, self.v_max)  # (N,)
        probs = jax.nn.softmax(out, axis=-1)  # (B..., A, N)
        # Q(x, a) = sum_i z_i p_i(x, a) (Bellemare et al. 2017, section 4).
        q_values = jnp.sum(probs * z, axis=-1)  # (B..., A)
        return HeadOutput(q_values=q_values, logits=out)
