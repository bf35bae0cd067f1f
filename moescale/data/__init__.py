"""Offline-RL datasets recorded by the trainer: on-disk format, writer and loader (see moescale.data.dataset)."""

from moescale.data.dataset import FORMAT_NAME, FORMAT_VERSION, MODES, DatasetWriter, episode_returns, load_dataset

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MODES", "DatasetWriter", "episode_returns", "load_dataset"]
