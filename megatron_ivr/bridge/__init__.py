"""The weight bridge: Megatron shards -> HF names -> flattened buckets -> transport -> engine."""
