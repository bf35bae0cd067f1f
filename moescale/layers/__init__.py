"""MoE building blocks usable on their own: each maps tokens (..., T, D) to (..., T, D)."""

from moescale.layers.dense import DenseMLP
from moescale.layers.experts import Experts, expert_param_count
from moescale.layers.routing import (
    ROUTING_KEYS,
    expert_choice_capacity,
    soft_moe_slots,
    topk_capacity,
    total_aux_loss,
)
from moescale.layers.soft_moe import SoftMoE, soft_moe_weights
from moescale.layers.sparse import ExpertChoiceMoE, TopKMoE, topk_assign
from moescale.layers.tokenize import AGGREGATIONS, TOKENIZERS, Tokenizer, aggregate, token_shape

__all__ = [
    "AGGREGATIONS", "ROUTING_KEYS", "TOKENIZERS", "DenseMLP", "ExpertChoiceMoE", "Experts", "SoftMoE",
    "Tokenizer", "TopKMoE", "aggregate", "expert_choice_capacity", "expert_param_count", "soft_moe_slots",
    "soft_moe_weights", "token_shape", "topk_assign", "topk_capacity", "total_aux_loss",
]
