"""Observation encoders: pixels or vectors -> a feature map for tokenization.

Axes:
  B  batch (any number of leading dims, including none)
  H, W, C  input height, width, channels
  h, w, c  output feature-map height, width, channels
  F  vector-observation features

Every encoder returns a feature map (B..., h, w, c) so that the tokenizer after it (PerConv: h*w tokens of
dim c; PerFeat: c tokens of dim h*w) works the same for every encoder; the MLP returns (B..., 1, 1, F_out).
Kernels use Xavier-uniform init and zero biases, as Dopamine's JAX networks do (the MoE paper,
Obando-Ceron et al. 2024, builds on those networks). Parameters are float32; `dtype` sets the computation
dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moescale import checks
from moescale.config import CONV_IMPLS
from moescale.layers.dense import xavier_dense
from moescale.layers.probes import sow_activation
from moescale.registry import lookup, register_encoder

Dtype = Any

_KERNEL_INIT = nn.initializers.xavier_uniform()


def preprocess(x: jax.Array, dtype: Dtype) -> jax.Array:
    """Cast observations to `dtype`; uint8 frames (Atari) are scaled to [0, 1] by /255 first."""
    if x.dtype == jnp.uint8:
        # Divide in float32 before any down-cast so bfloat16 runs see the same rounding of pixel values.
        return (x.astype(jnp.float32) / 255.0).astype(dtype)
    return x.astype(dtype)


class PatchConv(nn.Module):
    """2-D convolution as one matmul over extracted patches (im2col), a drop-in for the nn.Conv of `_conv`: the
    same parameters (kernel (k, k, C, F), bias (F,)), initializers, padding rule and output.

    Why: vmapped over seeds (one parameter set each), lax's convolution becomes a grouped convolution
    (feature_group_count = seeds, and batch_group_count for the kernel's gradient), where a matmul over patches
    vmaps into a batched matmul. On 2-core CPUs the compiled MinAtar trainer ran faster with it in every
    configuration measured, vmapped or not: 1.1-1.7x on an AVX2 machine, 1.2-2.1x on an AVX-512 one
    (BENCHMARKS.md, throughput table), so the MinAtar presets use it. The Atari encoders' updates are slower
    with it on CPU.
    """

    features: int
    kernel_size: int
    stride: int
    padding: str  # "SAME" or "VALID", as in lax
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, C) -> (N, h, w, features)."""
        k, c = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", _KERNEL_INIT, (k, k, c, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        patches = extract_patches(x.astype(self.dtype), k, self.stride, self.padding)  # (N, h, w, k*k*C)
        return patches @ kernel.reshape(k * k * c, self.features).astype(self.dtype) + bias.astype(self.dtype)


def extract_patches(x: jax.Array, kernel: int, stride: int, padding: str) -> jax.Array:
    """(N, H, W, C) -> (N, h, w, kernel * kernel * C): at each output position the input window, ordered
    (row offset, column offset, channel) like a (k, k, C, F) kernel flattened to (k * k * C, F); padding and
    output size follow lax ("SAME": h = ceil(H / stride); "VALID": h = (H - kernel) // stride + 1)."""
    pads = jax.lax.padtype_to_pads(x.shape[1:3], (kernel, kernel), (stride, stride), padding)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    h = (x.shape[1] - kernel) // stride + 1
    w = (x.shape[2] - kernel) // stride + 1
    windows = [x[:, i:i + (h - 1) * stride + 1:stride, j:j + (w - 1) * stride + 1:stride, :]
               for i in range(kernel) for j in range(kernel)]
    return jnp.concatenate(windows, axis=-1)


def _conv(features: int, kernel: int, stride: int, padding: str, dtype: Dtype, name: str,
          impl: str = "lax") -> nn.Module:
    checks.choice("conv", impl, CONV_IMPLS)
    if impl == "matmul":
        return PatchConv(features, kernel, stride, padding, dtype, name=name)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        kernel_init=_KERNEL_INIT,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _flatten_batch(x: jax.Array, name: str) -> tuple[jax.Array, tuple[int, ...]]:
    """(B..., H, W, C) -> (prod(B), H, W, C) and the leading shape, so convs and pools see one batch dim."""
    if x.ndim < 3:
        raise ValueError(f"{name}: observations must have shape (..., H, W, C), got shape {x.shape}")
    lead = x.shape[:-3]
    return x.reshape((-1, *x.shape[-3:])), lead


class NatureCNN(nn.Module):
    """Nature DQN torso (Mnih et al. 2015): (B..., 84, 84, 4) -> (B..., 7, 7, 64)."""

    dtype: Dtype = jnp.float32
    conv: str = "lax"  # CONV_IMPLS: "matmul" computes each convolution as a matmul over patches (PatchConv)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B..., H, W, C) -> (B..., h, w, 64); VALID padding, so 84 -> 20 -> 9 -> 7."""
        x, lead = _flatten_batch(x, "NatureCNN")
        x = preprocess(x, self.dtype)
        # (features, kernel, stride) from Mnih et al. 2015, "Methods: model architecture".
        for i, (features, kernel, stride) in enumerate(((32, 8, 4), (64, 4, 2), (64, 3, 1))):
            x = nn.relu(_conv(features, kernel, stride, "VALID", self.dtype, f"conv_{i}", self.conv)(x))
            sow_activation(self, f"conv_{i}", x)
        return x.reshape((*lead, *x.shape[1:]))


class _ImpalaResidualBlock(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus the skip (Espeholt et al. 2018, figure 3)."""

    channels: int
    dtype: Dtype = jnp.float32
    conv: str = "lax"  # CONV_IMPLS: "matmul" computes each convolution as a matmul over patches (PatchConv)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(x)
        y = _conv(self.channels, 3, 1, "SAME", self.dtype, "conv_0", self.conv)(y)
        y = nn.relu(y)
        y = _conv(self.channels, 3, 1, "SAME", self.dtype, "conv_1", self.conv)(y)
        return x + y


class ImpalaCNN(nn.Module):
    """IMPALA deep torso (Espeholt et al. 2018): (B..., 84, 84, 4) -> (B..., 11, 11, channels[-1])."""

    channels: Sequence[int] = (16, 32, 32)
    dtype: Dtype = jnp.float32
    conv: str = "lax"  # CONV_IMPLS: "matmul" computes each convolution as a matmul over patches (PatchConv)

    def __post_init__(self) -> None:
        checks.positive_ints("channels", self.channels)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B..., H, W, C) -> (B..., h, w, channels[-1]); each stack halves H, W: 84 -> 42 -> 21 -> 11."""
        x, lead = _flatten_batch(x, "ImpalaCNN")
        x = preprocess(x, self.dtype)
        for i, ch in enumerate(self.channels):
            x = _conv(ch, 3, 1, "SAME", self.dtype, f"stack_{i}_conv", self.conv)(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            for j in range(2):
                x = _ImpalaResidualBlock(ch, self.dtype, self.conv, name=f"stack_{i}_res_{j}")(x)
        # The residual stream is never rectified inside the stacks, hence the final ReLU.
        x = nn.relu(x)
        sow_activation(self, "out", x)
        return x.reshape((*lead, *x.shape[1:]))


class MinAtarCNN(nn.Module):
    """MinAtar conv (Young & Tian 2019; Obando-Ceron 2021): (B..., 10, 10, C) -> (B..., 10, 10, 16)."""

    features: int = 16
    dtype: Dtype = jnp.float32
    conv: str = "lax"  # CONV_IMPLS: "matmul" computes each convolution as a matmul over patches (PatchConv)

    def __post_init__(self) -> None:
        checks.positive_int("features", self.features)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B..., H, W, C) -> (B..., H, W, features); SAME padding (Flax) keeps the 10x10 grid."""
        x, lead = _flatten_batch(x, "MinAtarCNN")
        x = preprocess(x, self.dtype)
        x = nn.relu(_conv(self.features, 3, 1, "SAME", self.dtype, "conv_0", self.conv)(x))
        sow_activation(self, "conv_0", x)
        return x.reshape((*lead, *x.shape[1:]))


class MLPEncoder(nn.Module):
    """Dense+ReLU stack for vector observations: (B..., F) -> (B..., 1, 1, hidden[-1])."""

    hidden: Sequence[int] = (256, 256)
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        checks.positive_ints("hidden", self.hidden)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B..., F) -> (B..., 1, 1, hidden[-1]); the 1x1 map lets every tokenizer follow any encoder."""
        if x.ndim < 1:
            raise ValueError(f"MLPEncoder: observations must have shape (..., F), got shape {x.shape}")
        x = preprocess(x, self.dtype)
        for i, width in enumerate(self.hidden):
            x = xavier_dense(width, self.dtype, f"dense_{i}")(x)
            x = nn.relu(x)
            sow_activation(self, f"dense_{i}", x)
        return x[..., None, None, :]


ENCODERS: dict[str, type[nn.Module]] = {
    "nature": NatureCNN,
    "impala": ImpalaCNN,
    "minatar": MinAtarCNN,
    "mlp": MLPEncoder,
}
# The field network.encoder_widths sets, per built-in encoder (the Nature CNN's widths are fixed; MinAtar's conv
# takes one width).
WIDTHS_FIELDS = {"impala": "channels", "minatar": "features", "mlp": "hidden"}


def _built_in_from_config(cls: type[nn.Module], config: Any, name: str | None = None) -> nn.Module:
    """A built-in encoder from the network config: its dtype, convolution and widths."""
    key = next(k for k, v in ENCODERS.items() if v is cls)
    kwargs: dict[str, Any] = {"dtype": jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32, "name": name}
    if "conv" in {f.name for f in dataclasses.fields(cls)}:
        kwargs["conv"] = config.conv
    if config.encoder_widths is not None:
        widths = config.encoder_widths
        kwargs[WIDTHS_FIELDS[key]] = widths[0] if key == "minatar" else widths
    return cls(**kwargs)


for _name, _cls in ENCODERS.items():
    # Registered encoders are flax modules built by `from_config(config, name=None)`.
    _cls.from_config = classmethod(_built_in_from_config)
    register_encoder(_name)(_cls)


def encoder_from_config(config: Any, name: str | None = None) -> nn.Module:
    """The encoder network.encoder names (a registered one: moescale.register_encoder), built from the config."""
    return lookup("encoder", config.encoder).from_config(config, name=name)


def make_encoder(encoder: str, **kwargs: Any) -> nn.Module:
    """Build the encoder registered under `encoder` with `kwargs` as its fields (flax `name` included)."""
    return lookup("encoder", encoder)(**kwargs)
