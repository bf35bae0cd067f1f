"""Image augmentation for data-efficient agents: DrQ's random shift (Kostrikov et al. 2021).

Axes: B batch, H, W image, C channels (stacked frames). Each image is padded by `pad` pixels on every side by
repeating its edge pixels, then cropped back to H x W at a random offset in [0, 2 pad] per axis, drawn per
image: a random translation by up to `pad` pixels (4 for 84x84 Atari frames).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moescale import checks


def random_shift(key: jax.Array, images: jax.Array, pad: int) -> jax.Array:
    """Randomly shifted copies of images (B, H, W, C) -> (B, H, W, C), same dtype; pad 0 returns them as is."""
    checks.int_at_least("pad", pad, 0)
    if images.ndim != 4:
        checks.fail("images.shape", tuple(images.shape), "must be (B, H, W, C)")
    if pad == 0:
        return images
    batch, height, width, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")  # (B, H+2p, W+2p, C)
    offsets = jax.random.randint(key, (batch, 2), 0, 2 * pad + 1)  # (B, 2) top-left corner of each crop

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)
