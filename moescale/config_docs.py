"""One line of description per config field, as `moescale config` prints them next to the resolved YAML.

Keys are dotted paths as `--set` takes them. tests/test_config_docs.py checks that every field of TrainConfig,
NetworkConfig and AgentConfig has exactly one entry, so a new field cannot go undocumented.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

FIELD_DOCS: dict[str, str] = {
    # ---------------------------------------------------------------------------------------------- the run
    "env": "environment: a MinAtar / classic-control name (compiled trainer), an Atari game, a game list or gym:<id>",
    "preset": "the preset this config started from (moescale presets)",
    "sticky_prob": "probability of repeating the previous action; null: the env's protocol (MinAtar 0.1, Atari 0.25)",
    "max_episode_steps": "episode cap in agent steps; null: the env's protocol (none on MinAtar, 27,000 on Atari)",
    "life_loss_terminal": "Atari: a lost life ends the learning episode (no bootstrap) while the game goes on",
    "network": "the value network (network.* below)",
    "agent": "the DQN-family agent (agent.* below)",
    "steps": "agent steps per seed (training steps with a dataset), trained in whole iterations",
    "seeds": "seeds trained together in one program",
    "seed": "seed s of the run uses PRNG key (seed + s)",
    "num_envs": "environments per seed; the replay ratio stays one update per agent.update_period agent steps",
    "iteration_steps": "agent steps per seed between metric rows, evaluations and checkpoints",
    "eval_episodes": "evaluation episodes per seed at the end of every iteration",
    "eval_max_steps": "step cap of an evaluation episode",
    "checkpoint_every": "iterations between checkpoints (the last iteration always writes one)",
    "seed_layout": "how seeds share the program: vmap (batched), unroll (a copy per seed), auto (the faster of "
                   "the two timed on this machine, cached; --no-autotune: unroll on CPU, vmap elsewhere)",
    "devices": "devices the seeds are spread over; null: the most local devices that divide the seeds",
    "dataset": "offline training: a recorded dataset directory; null: learn from the environment",
    "dataset_subset": "offline: fraction of the recorded seed's transitions kept, in (0, 1]",
    "dataset_mode": "offline: which fraction, the first, the last or a uniform sample",
    "dataset_seed": "offline: which recorded seed's stream is loaded",
    "analysis_every": "iterations between in-training analyses and parameter snapshots; 0: off",
    "analysis_batch": "replay transitions each in-training analysis measures",
    "log": "live logging of the metric rows every iteration: tensorboard, wandb (the log extra)",
    # ------------------------------------------------------------------------------------------ the network
    "network.encoder": "observation encoder: nature, impala, minatar (Conv 16 3x3) or mlp",
    "network.encoder_widths": "the encoder's widths; null: its published ones",
    "network.conv": "convolutions by lax, or as a matmul over extracted patches (matmul: faster vmapped on CPU)",
    "network.moe": "penultimate layer: dense, softmoe, topk, expert_choice, or none (features straight to the head)",
    "network.num_experts": "experts of an MoE layer (1 for dense and none)",
    "network.hidden": "expert hidden width, or the dense layer's width before width_multiplier",
    "network.width_multiplier": "dense only: its width is hidden x this (the paper's scaled baseline)",
    "network.capacity_factor": "slots (Soft MoE) or tokens (Top-k, expert choice) per expert, as a share of T / E",
    "network.slots_per_expert": "softmoe: slots per expert; null: ceil(T * capacity_factor / E)",
    "network.k": "topk: experts each token picks",
    "network.normalize": "softmoe: l2-normalize tokens and Phi over D with a learned scale (Puigcerver et al.)",
    "network.phi_init": "softmoe: Phi's LeCun-normal fan-in, lecun_ed E*D (Dopamine, vmoe) or lecun_d D",
    "network.phi_scale": "softmoe: Phi's initial values times this (a remedy for uniform routing)",
    "network.random_phi": "softmoe: the random-routing ablation, Phi never learns",
    "network.random_phi_mode": "softmoe with random_phi: redraw N(0, 1) every forward pass (Dopamine), or frozen",
    "network.router_noise": "topk: Gaussian noise on the router logits while training and acting",
    "network.router_noise_scale": "topk: noise std router_noise / E (per_expert, Dopamine) or router_noise",
    "network.router_init": "topk, expert_choice: the router's init, lecun (Dopamine) or xavier",
    "network.capacity_times_k": "topk: capacity ceil(T * k * cf / E) (GShard) instead of ceil(T * cf / E)",
    "network.aux_loss": "topk: auxiliary loss, load_balance, z_loss, both, or null",
    "network.residual": "around the layer: tokens + layer(tokens) (a remedy for collapse)",
    "network.pre_norm": "around the layer: a LayerNorm over D of each token before it (vmoe's blocks)",
    "network.tokenizer": "per_conv, per_feature, per_sample or per_patch; null: per_sample for dense, else per_conv",
    "network.patch_size": "per_patch: patch side in feature-map cells",
    "network.patch_dim": "per_patch: each patch projected to this dim; null keeps the channel count",
    "network.aggregation": "output tokens to one vector: flatten, mean or sum",
    "network.head": "q (one value per action) or c51 (a distribution over num_atoms)",
    "network.dueling": "dueling head: value and advantage streams",
    "network.num_atoms": "c51: atoms of the support; null for a q head",
    "network.v_min": "c51: the support's lowest value",
    "network.v_max": "c51: the support's highest value",
    "network.noisy": "noisy-net head (factorised Gaussian noise)",
    "network.noisy_sigma0": "noisy nets' initial noise scale (Fortunato et al. 2018)",
    "network.dtype": "computation dtype, float32 or bfloat16 (parameters stay float32)",
    # -------------------------------------------------------------------------------------------- the agent
    "agent.kind": "the agent: dqn (DQN with Rainbow's options), or one registered with moescale.register_agent",
    "agent.learning_rate": "Adam's learning rate",
    "agent.adam_eps": "Adam's epsilon",
    "agent.batch_size": "transitions per gradient update",
    "agent.gamma": "discount",
    "agent.update_period": "agent steps per gradient update (replay ratio 1 / update_period)",
    "agent.target_update_period": "agent steps between target-network copies",
    "agent.min_replay": "agent steps of random acting before learning starts",
    "agent.replay_capacity": "transitions the replay holds per seed",
    "agent.eps_start": "exploration epsilon at min_replay",
    "agent.eps_end": "exploration epsilon after the decay",
    "agent.eps_decay_steps": "agent steps over which epsilon decays linearly",
    "agent.eps_eval": "epsilon of evaluation episodes",
    "agent.loss": "TD loss: mse (Dopamine's) or huber",
    "agent.double_q": "double Q-learning targets",
    "agent.n_step": "n-step returns, stopping at episode ends",
    "agent.cql_alpha": "weight of the CQL(H) regularizer (offline); 0: off",
    "agent.prioritized": "prioritized replay (sum tree)",
    "agent.priority_alpha": "prioritized replay: P(i) ~ priority^alpha",
    "agent.priority_beta_start": "prioritized replay: importance-weight exponent at min_replay",
    "agent.priority_beta_steps": "prioritized replay: agent steps over which beta anneals to 1",
    "agent.augmentation": "none or random_shift (DrQ's random shifts of image observations)",
    "agent.shift_pad": "random_shift: largest shift in pixels",
}


def field_paths(config: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every field of a config dataclass instance, nested ones included (network.k, ...)."""
    paths = []
    for field in dataclasses.fields(config):
        paths.append(prefix + field.name)
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            paths.extend(field_paths(value, prefix + field.name + "."))
    return paths


def annotated_yaml(config: Any) -> str:
    """A TrainConfig as the YAML of its config.yaml (it loads back to the same config), each field followed by its
    one-line description as a comment."""
    rows = []  # (yaml line, description)
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            rows.append((f"{key}:", FIELD_DOCS[key]))
            rows += [("  " + _yaml_line(sub, v), FIELD_DOCS[f"{key}.{sub}"]) for sub, v in value.items()]
        else:
            rows.append((_yaml_line(key, value), FIELD_DOCS[key]))
    width = max(len(text) for text, _ in rows)
    return "\n".join(f"{text:<{width}}  # {doc}" for text, doc in rows)


def _yaml_line(key: str, value: Any) -> str:
    """"key: value" with the value in YAML's flow style (a list as [16, 32]); a lone scalar's "..." end dropped."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return f"{key}: {text.removesuffix('...').strip()}"
