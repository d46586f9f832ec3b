from recbole_mm.utils.utils import RecboleMMError, get_model, get_trainer, recbole_mm_model_names, recbole_model_names

__all__ = ["RecboleMMError", "get_model", "get_trainer", "recbole_mm_model_names", "recbole_model_names"]
