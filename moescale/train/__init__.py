"""Training loops: the compiled trainer (anakin), host-side runs, checkpoints."""
