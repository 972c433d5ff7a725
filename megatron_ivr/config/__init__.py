"""Typed configuration: dataclasses per component, YAML with ``defaults:``, dotted overrides."""

from megatron_ivr.config.errors import ConfigError
from megatron_ivr.config.loader import dump_config, load_config
from megatron_ivr.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "dump_config", "load_config"]
