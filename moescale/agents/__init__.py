"""Value-based agents as pure functions (init, act, update) that any training loop can drive."""

from moescale.agents.dqn import Agent, DQNState, epsilon_schedule, make_dqn, td_loss

__all__ = ["Agent", "DQNState", "epsilon_schedule", "make_dqn", "td_loss"]
