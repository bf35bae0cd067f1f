"""Environments: gymnax adapter (on device) for the compiled training loop."""

from moescale.envs.jax_envs import ENV_NAMES, EnvState, JaxEnv, TimeStep, make_env, random_policy_returns

__all__ = ["ENV_NAMES", "EnvState", "JaxEnv", "TimeStep", "make_env", "random_policy_returns"]
