"""recbole-mm models; each lives in ``recbole_mm/model/<name lower>.py`` (see recbole_mm.utils.get_model)."""
