"""Models written for this project (a compact LLaMA with the paper's configs)."""
from slcompile.model_configs import CONFIGS, LlamaConfig, get_config
from slcompile.recipes.models.llama import Llama, count_params

__all__ = ["CONFIGS", "Llama", "LlamaConfig", "count_params", "get_config"]
