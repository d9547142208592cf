"""Offline models: the tiny-model factory, checkpoint loading and hub-id resolution.

Example:
    >>> from areal_agents.models import tiny
    >>> model, tokenizer = tiny("xs", seed=0)
"""

from .hub import hub_cache_dir, is_hub_id, resolve_hub_id
from .loading import eos_token_ids, load, parse_tiny_spec, resolve_checkpoint, resolve_dtype
from .tiny import SIZES, chat_template, save_tiny, tiny, tiny_config, tiny_tokenizer

__all__ = ["SIZES", "chat_template", "eos_token_ids", "hub_cache_dir", "is_hub_id", "load",
           "parse_tiny_spec", "resolve_checkpoint", "resolve_dtype", "resolve_hub_id", "save_tiny",
           "tiny", "tiny_config", "tiny_tokenizer"]
