from recbole_mm.quick_start.quick_start import build, prepare_inputs, run

__all__ = ["build", "prepare_inputs", "run"]
