"""Analysis tools for trained MoE layers: expert-subset inference and the implicit-bias reproduction."""
