from recbole_mm.config.configurator import DATA_ENV_VAR, PROPERTIES_DIR, Config, default_data_path

__all__ = ["DATA_ENV_VAR", "PROPERTIES_DIR", "Config", "default_data_path"]
