"""Offline models: the tiny-model factory and checkpoint loading.

Example:
    >>> from areal_agents.models import tiny
    >>> model, tokenizer = tiny("xs", seed=0)
"""

from .loading import load, parse_tiny_spec
from .tiny import SIZES, chat_template, save_tiny, tiny, tiny_config, tiny_tokenizer

__all__ = ["SIZES", "chat_template", "load", "parse_tiny_spec", "save_tiny", "tiny", "tiny_config",
           "tiny_tokenizer"]
