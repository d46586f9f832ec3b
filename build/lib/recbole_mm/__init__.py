"""recbole-mm: multimodal sequential recommendation on top of RecBole."""
from recbole_mm import compat  # noqa: F401  (must run before RecBole modules are used)

__version__ = "0.1.0"
