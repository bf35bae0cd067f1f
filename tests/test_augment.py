"""DrQ's random shift against a brute force over every possible offset."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.agents.augment import random_shift


def test_each_image_is_an_edge_padded_crop_and_offsets_vary():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 12, 10, 2), dtype=np.uint8)
    out = np.asarray(jax.jit(random_shift, static_argnums=2)(jax.random.key(0), jnp.asarray(images), 3))
    assert out.shape == images.shape and out.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="edge")
    found = set()
    for b in range(len(images)):
        # brute force: the offsets (dy, dx) in [0, 6]^2 whose crop equals the output
        hits = [(dy, dx) for dy in range(7) for dx in range(7)
                if np.array_equal(padded[b, dy:dy + 12, dx:dx + 10], out[b])]
        assert hits, f"image {b} is not a crop of its padded copy"
        found.add(hits[0])
    assert len(found) > 20  # 49 possible offsets, 64 images: shifts are drawn per image


def test_pad_zero_is_identity_and_bad_input_fails():
    images = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    np.testing.assert_array_equal(random_shift(jax.random.key(0), images, 0), images)
    with pytest.raises(ValueError, match="pad=-1"):
        random_shift(jax.random.key(0), images, -1)
    with pytest.raises(ValueError, match="images.shape"):
        random_shift(jax.random.key(0), images[0], 2)
