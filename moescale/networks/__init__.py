"""Value networks: encoders, heads and build_network(config, obs_shape, num_actions)."""

from moescale.networks.encoders import ENCODERS, ImpalaCNN, MinAtarCNN, MLPEncoder, NatureCNN, make_encoder
from moescale.networks.heads import HeadOutput, NoisyDense, QHead, support
from moescale.networks.network import (
    Network,
    NetworkInfo,
    QNetwork,
    build_network,
    describe_network,
    param_counts,
)

__all__ = [
    "ENCODERS", "HeadOutput", "ImpalaCNN", "MLPEncoder", "MinAtarCNN", "NatureCNN", "Network", "NetworkInfo",
    "NoisyDense", "QHead", "QNetwork", "build_network", "describe_network", "make_encoder", "param_counts", "support",
]
