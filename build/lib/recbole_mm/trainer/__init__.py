from recbole_mm.trainer.trainer import MMTrainer, SafeCheckpointMixin, TrainingStage, with_safe_checkpoints

__all__ = ["MMTrainer", "SafeCheckpointMixin", "TrainingStage", "with_safe_checkpoints"]
