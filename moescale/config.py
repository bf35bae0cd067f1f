"""Typed, frozen, validated configuration.

Every config is a frozen dataclass checked at construction: a bad value raises one ValueError naming the
field, the value and what is allowed, before anything is built or traced. Derived values come from pure
functions that return new objects; configs are never mutated.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from moescale import checks, registry

# The built-in penultimate layers, and "none": no penultimate layer, the encoder's features flattened straight
# into the head (Dopamine's MinAtar network, labs/environments/minatar/minatar_env.py). moe_names() adds the
# layers registered with moescale.register_layer.
MOE_TYPES = (*registry.BUILTIN["layer"][0], "none")
ENCODER_NAMES = registry.BUILTIN["encoder"][0]


def moe_names() -> tuple[str, ...]:
    """What network.moe takes: every registered penultimate layer (the built-ins first), then "none"."""
    return (*registry.names("layer"), "none")
CONV_IMPLS = ("lax", "matmul")  # how the encoders compute convolutions (moescale.networks.encoders)
HEAD_TYPES = ("q", "c51")
DTYPES = ("float32", "bfloat16")
TOKENIZER_NAMES = ("per_conv", "per_feature", "per_sample", "per_patch")
AGGREGATION_NAMES = ("flatten", "mean", "sum")
AUX_LOSS_NAMES = (None, "load_balance", "z_loss", "both")
PHI_INITS = ("lecun_ed", "lecun_d")  # moescale.layers.soft_moe.phi_initializer
RANDOM_PHI_MODES = ("redraw", "frozen")
ROUTER_INITS = ("lecun", "xavier")  # moescale.layers.sparse.router_initializer
ROUTER_NOISE_SCALES = ("per_expert", "absolute")
MOE_LAYERS = ("softmoe", "topk", "expert_choice")
MAX_SEED = 2**62  # the largest run seed: room below 2**63 for the offsets added to it

# What a config.yaml written before these fields existed meant: a stored run reads back with these values where
# the field is missing, so it resumes and analyses as it trained (moescale.train.run.load_run_config).
LEGACY_NETWORK_DEFAULTS = {"phi_init": "lecun_d", "random_phi_mode": "frozen", "router_init": "xavier",
                           "router_noise_scale": "absolute", "capacity_times_k": True}


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Value network: encoder -> tokenizer -> penultimate layer (dense or MoE) -> aggregation -> head.

    Defaults follow Obando-Ceron et al. 2024 and their code (Dopamine labs/moes): Impala encoder, per_conv
    tokens, experts Dense(512) -> ReLU -> Dense(token dim), capacity factor 1.0, Soft MoE without normalization,
    Phi LeCun-normal with fan-in E*D, a bias-free LeCun-initialised Top-k router whose noise std is
    router_noise / E, Top-k capacity ceil(T * cf / E), flattened output, no residual path or normalization
    around the layer. moe="dense" with the default tokenizer is the paper's baseline flatten -> Dense(512 *
    width_multiplier) -> ReLU; with another tokenizer it is one MLP shared by all tokens (Sokar et al. 2025).
    moe="none" has no penultimate layer (encoder -> flatten -> head).
    """

    encoder: str = "impala"
    encoder_widths: tuple[int, ...] | None = None  # None: the encoder's published widths
    conv: str = "lax"  # convolutions: lax's, or "matmul" over extracted patches (faster under vmap over seeds)
    moe: str = "softmoe"
    num_experts: int = 1
    hidden: int = 512  # expert hidden width, or the dense layer's width before width_multiplier
    width_multiplier: int = 1  # dense only: the "scaled baseline"
    capacity_factor: float = 1.0
    slots_per_expert: int | None = None  # softmoe only; None: ceil(tokens * capacity_factor / experts)
    k: int = 1  # topk only
    normalize: bool = False  # softmoe only
    # softmoe only. Phi's LeCun-normal fan-in: "lecun_ed" E*D (flax's default axes on the (D, E, S) array, as
    # Dopamine labs/moes and vmoe), "lecun_d" D (std sqrt(E) times larger; moescale before this field existed).
    phi_init: str = "lecun_ed"
    phi_scale: float = 1.0  # softmoe only: Phi's initial values times this (1: the initializer's own)
    random_phi: bool = False  # softmoe only: the paper's random-routing ablation, Phi never learns
    # softmoe with random_phi: "redraw" a fresh N(0, 1) Phi on every forward pass (Dopamine labs/moes), or keep
    # the "frozen" initial Phi
    random_phi_mode: str = "redraw"
    router_noise: float = 0.0  # topk only
    # topk: noise std router_noise / E ("per_expert", Dopamine labs/moes after Riquelme et al. 2021) or
    # router_noise ("absolute")
    router_noise_scale: str = "per_expert"
    router_init: str = "lecun"  # topk, expert_choice: the bias-free router's init, "lecun" (Dopamine) or "xavier"
    capacity_times_k: bool = False  # topk: capacity ceil(T * k * cf / E) (GShard) instead of ceil(T * cf / E)
    aux_loss: str | None = None  # topk only
    # Around any MoE layer (and the tokenized dense MLP): tokens + layer(tokens) ...
    residual: bool = False
    # ... and a LayerNorm over D of each token before the layer (vmoe's blocks: x + MoE(LayerNorm(x)))
    pre_norm: bool = False
    tokenizer: str | None = None  # None: per_sample for dense, per_conv for MoE layers
    patch_size: int = 1  # per_patch only
    patch_dim: int | None = None  # per_patch only; None keeps the channel count
    aggregation: str = "flatten"
    head: str = "q"
    dueling: bool = False
    num_atoms: int | None = None  # c51 only
    v_min: float = -10.0
    v_max: float = 10.0
    noisy: bool = False
    noisy_sigma0: float = 0.5  # Fortunato et al. 2018
    dtype: str = "float32"

    def __post_init__(self) -> None:
        registry.check_name("encoder", self.encoder)
        if self.encoder_widths is not None:
            if not isinstance(self.encoder_widths, tuple) or not self.encoder_widths or any(
                    isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.encoder_widths):
                checks.fail("encoder_widths", self.encoder_widths, "must be None or a tuple of positive ints")
        checks.choice("conv", self.conv, CONV_IMPLS)
        checks.choice("moe", self.moe, moe_names())
        checks.positive_int("num_experts", self.num_experts)
        checks.positive_int("hidden", self.hidden)
        checks.positive_int("width_multiplier", self.width_multiplier)
        checks.positive_number("capacity_factor", self.capacity_factor)
        checks.optional_positive_int("slots_per_expert", self.slots_per_expert)
        checks.positive_int("k", self.k)
        checks.non_negative_number("router_noise", self.router_noise)
        checks.choice("phi_init", self.phi_init, PHI_INITS)
        checks.positive_number("phi_scale", self.phi_scale)
        checks.choice("random_phi_mode", self.random_phi_mode, RANDOM_PHI_MODES)
        checks.choice("router_noise_scale", self.router_noise_scale, ROUTER_NOISE_SCALES)
        checks.choice("router_init", self.router_init, ROUTER_INITS)
        for name in ("normalize", "random_phi", "capacity_times_k", "residual", "pre_norm",
                     "dueling", "noisy"):
            if not isinstance(getattr(self, name), bool):
                checks.fail(name, getattr(self, name), "must be true or false")
        checks.choice("aux_loss", self.aux_loss, AUX_LOSS_NAMES)
        checks.choice("tokenizer", self.tokenizer, (None, *TOKENIZER_NAMES))
        checks.positive_int("patch_size", self.patch_size)
        checks.optional_positive_int("patch_dim", self.patch_dim)
        checks.choice("aggregation", self.aggregation, AGGREGATION_NAMES)
        checks.choice("head", self.head, HEAD_TYPES)
        checks.optional_positive_int("num_atoms", self.num_atoms)
        checks.positive_number("noisy_sigma0", self.noisy_sigma0)
        checks.choice("dtype", self.dtype, DTYPES)
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.encoder_widths is not None and self.encoder == "nature":
            checks.fail("encoder_widths", self.encoder_widths, "the nature encoder has fixed widths: use None")
        if self.encoder_widths is not None and self.encoder == "minatar" and len(self.encoder_widths) != 1:
            checks.fail("encoder_widths", self.encoder_widths, "the minatar encoder takes one width, e.g. (16,)")
        scaling = "none" if self.moe == "none" else registry.layer_scaling(self.moe)
        if scaling != "experts" and self.num_experts != 1:
            checks.fail("num_experts", self.num_experts,
                        f"moe={self.moe!r} has no experts: leave num_experts=1"
                        + (" and scale width_multiplier" if scaling == "width" else ""))
        if scaling != "width" and self.width_multiplier != 1:
            checks.fail("width_multiplier", self.width_multiplier,
                        f"applies to layers that scale their width, as moe='dense' (moe={self.moe!r})"
                        + (": scale num_experts instead" if scaling == "experts" else ""))
        self._check_around_layer()
        if self.moe == "topk" and self.k > self.num_experts:
            checks.fail("k", self.k, f"must be <= num_experts={self.num_experts}")
        if self.head == "c51" and (self.num_atoms is None or self.num_atoms < 2):
            checks.fail("num_atoms", self.num_atoms, "a c51 head needs num_atoms >= 2 (the paper uses 51)")
        if self.head == "q" and self.num_atoms is not None:
            checks.fail("num_atoms", self.num_atoms, "only a c51 head has atoms: set head='c51' or num_atoms=None")
        if not self.v_min < self.v_max:
            checks.fail("v_min", self.v_min, f"must be < v_max={self.v_max}")

    def _check_around_layer(self) -> None:
        wraps = [name for name in ("residual", "pre_norm") if getattr(self, name)]
        if wraps and self.moe == "none":
            checks.fail(wraps[0], True, "moe='none' has no penultimate layer to put it around")
        if self.moe == "none" and self.tokenizer is not None:
            checks.fail("tokenizer", self.tokenizer, "moe='none' flattens the feature map into the head: leave "
                        "tokenizer unset")
        if self.moe == "none" and self.aggregation != "flatten":
            checks.fail("aggregation", self.aggregation, "moe='none' flattens the feature map into the head: "
                        "leave aggregation 'flatten'")
        if self.residual and self.moe == "dense" and self.token_kind == "per_sample":
            checks.fail("residual", True, "the dense layer on one flattened token maps it to width "
                        f"{self.hidden * self.width_multiplier}, not its own dim: a residual needs equal dims "
                        "(give network.tokenizer, e.g. per_conv, for the token-wise dense MLP)")

    @property
    def token_kind(self) -> str:
        """Tokenizer actually used (resolves the None default)."""
        if self.tokenizer is not None:
            return self.tokenizer
        return "per_sample" if self.moe in ("dense", "none") else "per_conv"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples become lists) for YAML/JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        """Inverse of to_dict; unknown keys raise ValueError suggesting the closest field."""
        return from_dict(cls, data)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from a dict, refusing unknown keys with a suggestion."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "valid: " + ", ".join(names)
            checks.fail(key, data[key], f"unknown {cls.__name__} field; {hint}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


LOSSES = ("mse", "huber")


AUGMENTATIONS = ("none", "random_shift")


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """DQN-family hyperparameters. Steps are agent steps (environment steps of one seed, all its envs)."""

    kind: str = "dqn"  # the registered agent (moescale.register_agent); "dqn": DQN with Rainbow's options
    learning_rate: float = 2.5e-4
    adam_eps: float = 3.125e-4
    batch_size: int = 32
    gamma: float = 0.99
    update_period: int = 4  # agent steps per gradient update (replay ratio 1/update_period)
    target_update_period: int = 1000  # agent steps between target-network copies
    min_replay: int = 1000  # agent steps of random acting before learning starts
    replay_capacity: int = 100_000
    eps_start: float = 1.0
    eps_end: float = 0.01
    eps_decay_steps: int = 250_000
    eps_eval: float = 0.001
    loss: str = "mse"
    double_q: bool = False
    n_step: int = 1  # n-step returns, stopping at episode ends (moescale.replay.nstep)
    cql_alpha: float = 0.0  # weight of the CQL(H) regularizer (offline agents); 0 turns it off
    # Prioritized replay (Schaul et al. 2016): P(i) ~ p_i^alpha; importance weights (N P(i))^-beta with beta
    # annealed linearly from priority_beta_start to 1 over priority_beta_steps agent steps after min_replay.
    prioritized: bool = False
    priority_alpha: float = 0.5
    priority_beta_start: float = 0.4
    priority_beta_steps: int = 10_000_000
    augmentation: str = "none"  # "random_shift": DrQ's random shifts of obs and next_obs (image observations)
    shift_pad: int = 4  # random_shift: largest shift in pixels

    def __post_init__(self) -> None:
        registry.check_name("agent", self.kind)
        checks.positive_number("learning_rate", self.learning_rate)
        checks.positive_number("adam_eps", self.adam_eps)
        for name in ("batch_size", "update_period", "target_update_period", "replay_capacity", "eps_decay_steps",
                     "n_step"):
            checks.positive_int(name, getattr(self, name))
        checks.int_at_least("min_replay", self.min_replay, 0)
        checks.non_negative_number("cql_alpha", self.cql_alpha)
        checks.positive_int("priority_beta_steps", self.priority_beta_steps)
        checks.choice("augmentation", self.augmentation, AUGMENTATIONS)
        checks.int_at_least("shift_pad", self.shift_pad, 0)
        for name in ("priority_alpha", "priority_beta_start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                checks.fail(name, value, "must be in [0, 1]")
        if not 0.0 <= self.gamma <= 1.0:
            checks.fail("gamma", self.gamma, "must be in [0, 1]")
        for name in ("eps_start", "eps_end", "eps_eval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                checks.fail(name, value, "must be a probability in [0, 1]")
        checks.choice("loss", self.loss, LOSSES)
        if self.batch_size > self.replay_capacity:
            checks.fail("batch_size", self.batch_size, f"must be <= replay_capacity={self.replay_capacity}")


SEED_LAYOUTS = ("auto", "vmap", "unroll")
LIVE_LOGS = ("tensorboard", "wandb")  # moescale.train.live
DATASET_MODES = ("first", "last", "uniform")  # moescale.data.load_dataset's subset modes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: environment, network, agent, budget and bookkeeping."""

    env: str = "Breakout-MinAtar"
    preset: str = "minatar-dqn"
    sticky_prob: float | None = None  # None: the environment's protocol default (MinAtar 0.1)
    max_episode_steps: int | None = None  # None: the environment's protocol default
    # Atari: a lost life ends the learning episode (no bootstrap) while the game goes on (Atari 100k protocol).
    life_loss_terminal: bool = False
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    agent: AgentConfig = dataclasses.field(default_factory=AgentConfig)
    steps: int = 10_000_000  # agent steps per seed
    seeds: int = 1
    seed: int = 0  # seed s of the run uses PRNG key (seed + s)
    num_envs: int = 1  # environments per seed
    iteration_steps: int = 10_000  # agent steps per seed between metric rows
    eval_episodes: int = 8
    eval_max_steps: int = 5_000  # per evaluation episode
    checkpoint_every: int = 10  # iterations
    # How the seeds share one compiled program. "vmap": one batched program over a seed axis (the GPU
    # design). "unroll": one copy of the per-seed program per seed, each seed's iteration its own loop in its
    # own buffers, which on CPU keeps a seed's weights in cache and lets XLA run seeds side by side (for 8
    # dense minatar-dqn seeds on 2 cores, 1.6x the vmap throughput; BENCHMARKS.md); compile time grows with
    # the seed count. "auto": the faster of the two, timed on the machine at hand with the devices (below)
    # (moescale.train.autotune, cached per machine, network and seed count); without timing (--no-autotune)
    # unroll on CPU, vmap elsewhere.
    seed_layout: str = "auto"
    # How many devices the seeds are spread over, each device running its share in the seed layout above (the
    # host trainer for Atari and gym: environments vmaps each device's share):
    # None takes the most local devices that divide the seeds evenly, or one when seed_layout "auto" times one
    # device faster (by 10%); the host trainer takes one CPU device. On CPU the moescale command makes one JAX
    # device per core unless the environment variable JAX_NUM_CPU_DEVICES=N (N host devices) is set.
    devices: int | None = None
    # Offline training: a dataset directory (moescale.data format, e.g. written by --record-dataset). When set,
    # no environment step is taken for training: every seed learns from the same fixed data, sampled uniformly,
    # one update every agent.update_period training steps (as in Dopamine's fixed-replay runner), so `steps`
    # and `iteration_steps` count training steps (num_envs plays no part). The environment only evaluates.
    dataset: str | None = None
    dataset_subset: float = 1.0  # fraction of the recorded seed's transitions to keep, in (0, 1]
    dataset_mode: str = "first"  # which fraction: the first, the last, or a uniform sample (drawn with `seed`)
    dataset_seed: int = 0  # which recorded seed's stream to load
    # Analysis during training (off at 0): every analysis_every iterations, the metrics of
    # moescale.networks.metrics.network_metrics on analysis_batch transitions drawn from each seed's replay (the
    # dataset offline) go into the metric rows of that iteration, and the online parameters of every seed are
    # kept in snapshots/ for `moescale analyze`.
    analysis_every: int = 0  # iterations
    analysis_batch: int = 256  # transitions
    # Live logging of the metric rows every iteration: "tensorboard", "wandb" (moescale.train.live).
    log: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("steps", "seeds", "num_envs", "iteration_steps", "eval_episodes", "eval_max_steps",
                     "checkpoint_every"):
            checks.positive_int(name, getattr(self, name))
        checks.int_at_least("seed", self.seed, 0)
        if self.seed > MAX_SEED:  # PRNG keys take 64-bit seeds, and offsets (seed + s, evaluation, analysis) are added
            checks.fail("seed", self.seed, "must be an int in [0, 2**62]")
        checks.int_at_least("analysis_every", self.analysis_every, 0)
        checks.positive_int("analysis_batch", self.analysis_batch)
        if (not isinstance(self.log, tuple) or len(set(self.log)) != len(self.log)
                or any(name not in LIVE_LOGS for name in self.log)):
            checks.fail("log", self.log, f"a list of distinct names from {', '.join(LIVE_LOGS)}")
        if self.sticky_prob is not None and not (isinstance(self.sticky_prob, int | float)
                                                 and 0.0 <= self.sticky_prob < 1.0):
            checks.fail("sticky_prob", self.sticky_prob, "must be None or in [0, 1)")
        checks.optional_positive_int("max_episode_steps", self.max_episode_steps)
        if not isinstance(self.life_loss_terminal, bool):
            checks.fail("life_loss_terminal", self.life_loss_terminal, "must be true or false")
        checks.choice("seed_layout", self.seed_layout, SEED_LAYOUTS)
        checks.optional_positive_int("devices", self.devices)
        if self.devices is not None and self.seeds % self.devices:
            checks.fail("devices", self.devices, f"must divide seeds={self.seeds}: every device runs as many seeds")
        period, envs = self.agent.update_period, self.num_envs
        if period % envs and envs % period:
            checks.fail("num_envs", envs, f"must divide agent.update_period={period} or be a multiple of it, "
                        "so the replay ratio stays the preset's")
        if self.iteration_steps % self.steps_per_loop:
            checks.fail("iteration_steps", self.iteration_steps,
                        f"must be a multiple of {self.steps_per_loop} agent steps (one acting+learning round)")
        if self.dataset is None and self.steps < self.agent.min_replay:
            checks.fail("steps", self.steps, f"must be >= agent.min_replay={self.agent.min_replay}")
        self._check_offline()

    def _check_offline(self) -> None:
        if self.dataset is not None and (not isinstance(self.dataset, str) or not self.dataset):
            checks.fail("dataset", self.dataset, "must be None or the path of a dataset directory")
        if (isinstance(self.dataset_subset, bool) or not isinstance(self.dataset_subset, int | float)
                or not 0 < self.dataset_subset <= 1):
            checks.fail("dataset_subset", self.dataset_subset, "must be a fraction in (0, 1], e.g. 0.1 for 10%")
        checks.choice("dataset_mode", self.dataset_mode, DATASET_MODES)
        checks.int_at_least("dataset_seed", self.dataset_seed, 0)
        if self.dataset is None:
            return
        if self.agent.prioritized:
            checks.fail("agent.prioritized", True, "must be false with a dataset (offline data is sampled uniformly)")
        if self.dataset_mode == "uniform" and self.dataset_subset < 1 and self.agent.n_step > 1:
            checks.fail("dataset_mode", "uniform", f"cannot serve agent.n_step={self.agent.n_step}: a uniform "
                        "subset keeps no consecutive steps; use first or last, or n_step=1")

    @property
    def steps_per_loop(self) -> int:
        """Agent steps per seed in one round of acting and learning: max(num_envs, update_period)."""
        return max(self.num_envs, self.agent.update_period)

    @property
    def iterations(self) -> int:
        """Metric rows per seed: ceil(steps / iteration_steps)."""
        return -(-self.steps // self.iteration_steps)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict for YAML."""
        out = dataclasses.asdict(self)
        out["network"] = self.network.to_dict()
        out["agent"] = dataclasses.asdict(self.agent)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict; unknown keys raise ValueError suggesting the closest field."""
        data = dict(data)
        if "network" in data:
            data["network"] = NetworkConfig.from_dict(data["network"])
        if "agent" in data:
            data["agent"] = from_dict(AgentConfig, data["agent"])
        return from_dict(cls, data)
