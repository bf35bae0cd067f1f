"""Value-based agents as pure functions (init, act, update) that any training loop can drive."""

from moescale.agents.dqn import (
    PRIORITY_FLOOR,
    Agent,
    DQNState,
    epsilon_schedule,
    make_agent,
    make_dqn,
    priority_beta,
    td_error,
    td_loss,
)
from moescale.agents.losses import c51_loss, categorical_projection, cql_regularizer

__all__ = ["PRIORITY_FLOOR", "Agent", "DQNState", "c51_loss", "categorical_projection", "cql_regularizer",
           "epsilon_schedule", "make_agent", "make_dqn", "priority_beta", "td_error", "td_loss"]
