"""The Megatron runtime: everything that runs a Qwen-VL policy on Megatron-Core and knows no RL.

Process groups and the CPU platform layer (``parallel``, ``platform``), layout checks
(``layout``), the model and its families (``qwen_vl``, ``families``, ``rope``,
``block_attention``), HF <-> Megatron names and shards (``state_dict_adapter``,
``hf_checkpoint``), build, load and gather (``build``), converters (``convert``), batching
(``batching``), log-prob passes (``logprobs``), the optimizer and its step (``optimizer``), a
rank's policy (``policy``), checkpoints (``checkpoint``, ``manifest``) and the output folders
that lose nothing (``output_dir``). Installed as ``megatron_ivr.model_providers``; see
docs/architecture.md.
"""
