"""Recipe schema, trainer, eps schedules, checkpoints and distributed helpers."""
