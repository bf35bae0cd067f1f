"""The supervised track's data, models and training loop (Chung et al., TMLR 2025, arXiv 2409.00879).

What `moescale implicit-bias` (moescale.analysis.implicit_bias) trains and measures: scikit-learn's bundled 8x8
digits cut into patch tokens, Gaussian tokens with the sum of their squared entries as target, a Soft MoE
classifier and regressor with a flat MLP control, and one jitted Adam loop over host-drawn minibatch orders.

Axes: N examples, T tokens, D token dim, E experts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moescale import checks
from moescale.layers.soft_moe import SoftMoE

COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
# numpy streams are seeded with (seed, stream, ...); the stream tags are nonzero because numpy's SeedSequence
# ignores trailing zeros ((0, 0) seeds the same generator as 0). The other streams are moescale.analysis's.
SPLIT_STREAM = 1


# ------------------------------------------------------------------------------------------- data


def digits_tokens(images: np.ndarray, patch: int = 4) -> np.ndarray:
    """Images (N, H, W) -> tokens (N, (H/p)(W/p), p*p): patches in row-major order, pixels row-major."""
    n, h, w = images.shape
    if h % patch or w % patch:
        checks.fail("patch", patch, f"must divide the image sides {h}x{w}")
    blocks = images.reshape(n, h // patch, patch, w // patch, patch)  # (N, row block, row, col block, col)
    return blocks.transpose(0, 1, 3, 2, 4).reshape(n, (h // patch) * (w // patch), patch * patch)


def digits_split(seed: int, test_fraction: float = 0.2, patch: int = 4
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as tokens in [0, 1]: x_train, y_train, x_test, y_test (split by seed)."""
    from sklearn.datasets import load_digits  # bundled with the package: nothing is downloaded

    data = load_digits()
    tokens = digits_tokens(data.images.astype(np.float32) / 16.0, patch)  # pixel values are 0..16
    labels = data.target.astype(np.int32)
    perm = np.random.default_rng((seed, SPLIT_STREAM)).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = perm[:n_test], perm[n_test:]
    return tokens[train], labels[train], tokens[test], labels[test]


def squared_norm_data(seed: int | tuple[int, ...], n: int, tokens: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian tokens (n, T, D) and the convex target sum of their squared entries (n,); seed may be a tuple."""
    x = np.random.default_rng(seed).normal(size=(n, tokens, dim)).astype(np.float32)
    return x, np.sum(x.astype(np.float64) ** 2, axis=(1, 2)).astype(np.float32)


# ------------------------------------------------------------------------------------------ models


class TokenClassifier(nn.Module):
    """Soft MoE (one slot per expert, bias-free experts) on tokens (..., T, D), then Dense on the flat tokens."""

    num_experts: int
    expert_hidden: int
    num_classes: int = 10

    def setup(self) -> None:
        self.moe = SoftMoE(self.num_experts, slots_per_expert=1, expert_hidden=self.expert_hidden,
                           expert_bias=False)
        self.head = nn.Dense(self.num_classes)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.classify(self.moe(tokens))

    def classify(self, moe_out: jax.Array) -> jax.Array:
        """Class logits from the Soft MoE's output tokens (..., T, D)."""
        return self.head(moe_out.reshape(*moe_out.shape[:-2], -1))


class TokenRegressor(nn.Module):
    """Soft MoE on tokens (..., T, D), then one shared linear readout per token, summed over tokens -> (...).

    The readout is linear in the Soft MoE outputs and nothing bypasses the layer, so with one expert and
    one slot the prediction is T * w . expert(slot) + b: a function of the single slot.
    """

    num_experts: int
    expert_hidden: int
    slots_per_expert: int = 1
    expert_bias: bool = True

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        y = SoftMoE(self.num_experts, slots_per_expert=self.slots_per_expert, expert_hidden=self.expert_hidden,
                    expert_bias=self.expert_bias, name="moe")(tokens)
        return jnp.sum(nn.Dense(1, name="readout")(y)[..., 0], axis=-1)


class FlatMLP(nn.Module):
    """Control: Dense(H) -> ReLU -> Dense(1) on the flattened tokens (sees every entry of the input)."""

    hidden: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        flat = tokens.reshape(*tokens.shape[:-2], -1)
        return nn.Dense(1)(nn.relu(nn.Dense(self.hidden)(flat)))[..., 0]


# ---------------------------------------------------------------------------------------- training


def batch_order(seed: int | tuple[int, ...], n: int, epochs: int, batch_size: int) -> np.ndarray:
    """Minibatch indices (epochs, n // batch_size, batch_size): a fresh shuffle of range(n) per epoch.

    seed may be a tuple (seed, stream, ...) so that every model draws its own order (nonzero last entry).

    Drawn on the host with numpy: a sort-based shuffle inside the jitted loop costs more to compile on
    XLA:CPU than the whole run of these small models. The remainder of each epoch is skipped.
    """
    rng = np.random.default_rng(seed)
    steps = n // batch_size
    return np.stack([rng.permutation(n)[: steps * batch_size].reshape(steps, batch_size) for _ in range(epochs)]
                    ).astype(np.int32)


def train(loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array], params: Any, x: jax.Array, y: jax.Array,
          batches: jax.Array, learning_rate: float) -> tuple[Any, jax.Array]:
    """Adam (learning rate cosine-decayed to 0) over batches (epochs, steps, B) of indices into x and y.

    Traceable (the callers jit it with init and evaluation as one program); returns the trained params and
    the mean training loss of each epoch (epochs,).
    """
    epochs, steps = batches.shape[:2]
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps))

    def step(carry, idx):
        p, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    def epoch(carry, order):
        carry, losses = jax.lax.scan(step, carry, order)
        return carry, jnp.mean(losses)

    (params, _), losses = jax.lax.scan(epoch, (params, opt.init(params)), batches)
    return params, losses


def jit_small(fn: Callable) -> Callable:
    # XLA:CPU compile time, not run time, dominates these small models (measured: ~40% less compile at
    # backend optimization level 0, for slower steps that matter less); one setting for every run keeps the
    # numbers reproducible.
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS)


def count_params(params: Any) -> int:
    return int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))
