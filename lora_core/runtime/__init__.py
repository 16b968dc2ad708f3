"""The training runtime: typed config, optimizers and schedules, checkpoints."""
