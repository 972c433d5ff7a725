"""The SGLang backend: server manager, async client, and the RolloutEngine over them."""
