"""Extra RecBole metrics (importing this package registers them with RecBole's evaluator)."""
from recbole_mm.evaluator.candidate_metrics import HR, VHR, ValidRatio, register_candidate_metrics

register_candidate_metrics()

__all__ = ["HR", "VHR", "ValidRatio", "register_candidate_metrics"]
