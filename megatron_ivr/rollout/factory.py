"""The engine a run's config asks for: SGLang servers (``rollout.backend=sglang`` with
``rollout.server_urls``) or the in-process engine. Training and evaluation both build theirs here."""

from __future__ import annotations

from megatron_ivr.config.errors import ConfigError
from megatron_ivr.config.schema import RolloutConfig
from megatron_ivr.models.tiny import load_model
from megatron_ivr.rollout.local import LocalEngine
from megatron_ivr.rollout.sglang.engine import engine_from_urls


def check_engine_config(rollout: RolloutConfig) -> None:
    """Refuse, before any model is loaded, an engine that cannot be built."""
    if rollout.backend == "sglang" and not rollout.server_urls:
        raise ConfigError("rollout.backend=sglang needs rollout.server_urls (start servers with the server manager "
                          "or `megatron-ivr launch`, which fills them in)", key="rollout.server_urls")


def make_engine(rollout: RolloutConfig, model_path: str, processor, batch_size: int):
    """``batch_size``: requests the in-process engine generates together (ignored by SGLang)."""
    check_engine_config(rollout)
    if rollout.backend == "sglang":
        return engine_from_urls(rollout.server_urls, processor.tokenizer, api_key=rollout.api_key)
    return LocalEngine(load_model(model_path), processor, batch_size=batch_size)
