from recbole_mm.trainer.fmrlrec_trainer import FMRLRecTrainer
from recbole_mm.trainer.trainer import MMTrainer, SafeCheckpointMixin, TrainingStage, with_safe_checkpoints

__all__ = ["FMRLRecTrainer", "MMTrainer", "SafeCheckpointMixin", "TrainingStage", "with_safe_checkpoints"]
