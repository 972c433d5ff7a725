"""Typed run configuration: one dataclass per component, composed into :class:`RunConfig`.

Every default that comes from ``shared/spec/algorithms.md`` cites its section. Fields are
validated by :mod:`megatron_ivr.config.loader` (types) and by each dataclass's
``validate`` (values); errors name the dotted key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol

from megatron_ivr.config.errors import ConfigError

OutputTemplate = Literal["ivr", "r1"]


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}", key=key)


@dataclass
class DataConfig:
    """Where samples come from and how images are prepared (Qwen resizing rules)."""

    train_path: str = "runs/demo/data/train.jsonl"
    val_path: Optional[str] = "runs/demo/data/val.jsonl"
    test_path: Optional[str] = "runs/demo/data/test.jsonl"
    image_root: Optional[str] = None  # relative image paths resolve here (default: file's dir)
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 448 * 448
    max_bad_fraction: float = 0.05  # stop the run when more samples than this are broken
    allow_outside_root: bool = False  # image paths may leave the dataset's folder (``..``, absolute)
    # a training prompt (chat template, question and image tokens) longer than this is a bad
    # sample: reported, skipped and counted (data/*/bad_samples)
    max_prompt_tokens: int = 1024
    # an image whose header declares more pixels is refused before it is decoded (a small PNG can
    # declare 169 Mpixel and take 1.3 GB to decode); max_pixels then resizes what is kept
    max_source_pixels: int = 8192 * 8192

    def validate(self, prefix: str = "data") -> None:
        _check(0 < self.min_pixels <= self.max_pixels, f"{prefix}.min_pixels",
               f"must satisfy 0 < min_pixels <= max_pixels, got {self.min_pixels} > {self.max_pixels}")
        _check(self.max_prompt_tokens >= 1, f"{prefix}.max_prompt_tokens", "must be >= 1")
        _check(self.max_source_pixels >= self.max_pixels, f"{prefix}.max_source_pixels",
               f"must be >= max_pixels={self.max_pixels}, got {self.max_source_pixels}")
        _check(0.0 <= self.max_bad_fraction <= 1.0, f"{prefix}.max_bad_fraction",
               f"must be in [0, 1], got {self.max_bad_fraction}")


# the synthetic task's question families (megatron_ivr/data/synthetic/questions.py writes them)
QUESTION_FAMILIES = ("count", "count_attr", "subtract", "compare", "arithmetic", "union", "sum")


@dataclass
class SyntheticDataConfig:
    """The synthetic visual-reasoning task (``megatron-ivr data synth``)."""

    output_dir: str = "runs/demo/data"
    seed: int = 0
    num_train: int = 512
    num_val: int = 64
    num_test: int = 64
    # the question families of val and test (and of train, less the held-out one); in val and
    # test the held-out family alternates with the others until it has its share (so the first
    # 2 * num_test / len(families) test questions hold all of it)
    families: list[str] = field(default_factory=lambda: ["count", "count_attr", "subtract", "compare",
                                                         "arithmetic"])
    # an answer-only RL prompt pool (rl.jsonl: question and answer, no trace) on its own scenes,
    # disjoint from train's draws; its families cycle in this order (repeat one to weight it)
    num_rl: int = 0
    rl_families: list[str] = field(default_factory=list)
    image_size: int = 112
    min_objects: int = 3
    max_objects: int = 7
    held_out_family: Optional[str] = "arithmetic"  # appears in val, test (and rl) only
    attributes: list[str] = field(default_factory=lambda: ["size", "color", "material", "shape"])  # that vary
    num_colors: int = 6
    # compact: no positions; cells: every cell in order; counts: how many of each kind
    description: Literal["full", "compact", "cells", "counts"] = "full"
    grid: int = 4  # the board is grid x grid cells (2, 3 or 4); one cell = one image token when
    # image_size = grid * 28 (Qwen2.5-VL) or grid * 32 (Qwen3-VL)

    def validate(self, prefix: str = "synthetic") -> None:
        for name in self.attributes:
            _check(name in ("size", "color", "material", "shape"), f"{prefix}.attributes",
                   f"unknown attribute {name!r}; choose from size, color, material, shape")
        _check("shape" in self.attributes, f"{prefix}.attributes", "must include 'shape' (every object has one)")
        for key in ("families", "rl_families"):
            for name in getattr(self, key):
                _check(name in QUESTION_FAMILIES, f"{prefix}.{key}",
                       f"unknown family {name!r}; choose from {', '.join(QUESTION_FAMILIES)}")
        _check(len(set(self.families)) == len(self.families) and self.families, f"{prefix}.families",
               "must list each family once, at least one")
        _check(self.held_out_family is None or self.held_out_family in self.families, f"{prefix}.held_out_family",
               f"must be one of synthetic.families {self.families}, got {self.held_out_family!r}")
        _check(len(self.families) > 1 or self.held_out_family is None, f"{prefix}.held_out_family",
               "needs another family for the train split")
        _check(self.num_rl == 0 or self.rl_families, f"{prefix}.rl_families",
               "must name the RL pool's families when num_rl > 0")
        _check(1 <= self.num_colors <= 6, f"{prefix}.num_colors", f"must be in [1, 6], got {self.num_colors}")
        _check(self.grid in (2, 3, 4), f"{prefix}.grid", f"must be 2, 3 or 4, got {self.grid}")
        _check(self.max_objects <= self.grid**2, f"{prefix}.max_objects",
               f"must be <= grid^2 = {self.grid**2}, got {self.max_objects}")
        _check(self.image_size >= 56, f"{prefix}.image_size", f"must be >= 56, got {self.image_size}")
        _check(1 <= self.min_objects <= self.max_objects, f"{prefix}.max_objects",
               "must satisfy 1 <= min_objects <= max_objects")
        for name in ("num_train", "num_val", "num_test", "num_rl"):
            _check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")


@dataclass
class ModelConfig:
    """The policy: a Hugging Face folder (converted to Megatron by the trainer)."""

    path: str = "runs/demo/models/qwen2_5_vl_tiny"
    # None: read from the folder's config.json; set, it is checked against the folder (and
    # sft.init_path) before anything loads
    family: Optional[Literal["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"]] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # MoE: megatron's load-balancing loss coefficient in training (RL and SFT). 0 by default: RL
    # keeps the pretrained router, as verl and slime do; a balancing term pulls the trainer's
    # routing away from the engine's (docs/models.md)
    moe_aux_loss_coeff: float = 0.0

    def validate(self, prefix: str = "model") -> None:
        _check(self.moe_aux_loss_coeff >= 0, f"{prefix}.moe_aux_loss_coeff", "must be >= 0")


@dataclass
class TinyModelConfig:
    """Random tiny Qwen-VL checkpoints made without a hub (``megatron-ivr model tiny``)."""

    output_dir: str = "runs/demo/models"
    families: list[str] = field(default_factory=lambda: ["qwen2_5_vl", "qwen3_vl"])
    tokenizer: Literal["bpe", "qwen"] = "bpe"
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 32
    # qwen3_vl_moe, qwen3_5_moe: experts per layer, experts per token, each expert's intermediate
    # size (qwen3_5_moe's shared expert: twice that)
    # (3/4 of hidden_size when None: unequal to 2 x hidden, so the fused layouts are told apart)
    num_experts: int = 8
    experts_per_token: int = 2
    expert_intermediate_size: Optional[int] = None
    # None: the family's own (1e6 / 5e6). With a tiny head_dim those leave MRoPE's height and
    # width slots with frequencies so low that the cells of a small image are indistinguishable
    rope_theta: Optional[float] = None
    seed: int = 0

    def validate(self, prefix: str = "tiny_model") -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "vision_depth",
                     "vision_hidden_size"):
            _check(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        for fam in self.families:
            _check(fam in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"), f"{prefix}.families",
                   f"unknown family {fam!r}; choose from qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe")
        _check(1 <= self.experts_per_token <= self.num_experts, f"{prefix}.experts_per_token",
               f"must be in [1, num_experts={self.num_experts}]")
        _check(self.hidden_size % self.num_heads == 0, f"{prefix}.hidden_size",
               "must be divisible by num_heads")
        _check(self.num_heads % self.num_kv_heads == 0, f"{prefix}.num_kv_heads",
               "must divide num_heads")
        head_dim = self.hidden_size // self.num_heads
        _check(head_dim % 2 == 0, f"{prefix}.hidden_size",
               f"hidden_size / num_heads = {head_dim} must be even (rotary embeddings rotate pairs of channels)")
        _check(self.vision_hidden_size % 8 == 0, f"{prefix}.vision_hidden_size",
               "must be a multiple of 8 (two vision heads, each with an even rotary half)")


@dataclass
class RewardConfig:
    """Reward of spec section 1: ``r = lam * r_format + (1 - lam) * r_accuracy``."""

    lam: float = 0.1  # spec section 1 (default)
    template: OutputTemplate = "ivr"
    grader_timeout_s: float = 5.0
    num_workers: int = 1

    def validate(self, prefix: str = "reward") -> None:
        _check(0.0 <= self.lam <= 1.0, f"{prefix}.lam", f"must be in [0, 1], got {self.lam}")
        _check(self.grader_timeout_s > 0, f"{prefix}.grader_timeout_s", "must be > 0")
        _check(self.num_workers >= 1, f"{prefix}.num_workers", "must be >= 1")


@dataclass
class RolloutConfig:
    """How responses are sampled (spec section 4.1 defaults)."""

    backend: Literal["local", "sglang"] = "local"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    server_urls: list[str] = field(default_factory=list)
    # sent as ``Authorization: Bearer``; servers started by `megatron-ivr launch` get it through
    # their environment, never their command line (the bind address is launch.server_host)
    api_key: Optional[str] = None
    max_weight_lag: int = 1  # reject samples from a policy more than this many steps old
    # when a step's responses are generated (docs/rollout.md, "Rollout modes"). sync: at the start
    # of the step, from the policy the step before left. one_step_off: during the step before, from
    # the policy two steps back, while that step trains (the local engine on a generator thread;
    # SGLang servers on their own GPUs): step k trains on responses of version max(k - 2, 0).
    # async: a generator thread keeps making batches, up to max_staleness ahead of the trainer;
    # weight pushes interrupt its generation, which continues on the new weights (partial
    # rollouts); no response with a token more than max_staleness versions behind is trained
    mode: Literal["sync", "one_step_off", "async"] = "sync"
    max_staleness: int = 1  # async only: >= 1
    weight_transport: Literal["local", "tensor", "distributed", "disk"] = "local"
    bucket_mb: int = 512
    server_tp_size: int = 1  # tensor-parallel size of each SGLang server (weights go to every TP rank)
    # the address SGLang servers reach trainer rank 0 at for the `distributed` transport
    # (None: 127.0.0.1, servers on the same machine); the Slurm launcher sets the trainer head node
    sync_master_address: Optional[str] = None
    # `distributed` with pipeline parallelism: each stage's leader broadcasts its own layers in its
    # own group (leaders other than rank 0 offer this host's address, or $IVR_SYNC_ADDRESS)
    sync_per_stage: bool = True
    # colocated GPUs: the servers release their memory (weights, KV cache) after the rollouts and
    # take it back before the weight sync (SGLang's release/resume_memory_occupation; no-op on CPU)
    offload_during_train: bool = False

    def validate(self, prefix: str = "rollout") -> None:
        _check(self.n >= 1, f"{prefix}.n", "must be >= 1")
        _check(self.temperature > 0, f"{prefix}.temperature",
               "must be > 0: the n responses of a prompt are sampled (greedy rollouts would be identical, "
               "every advantage 0; evaluation is greedy on its own)")
        _check(0 < self.top_p <= 1, f"{prefix}.top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", "must be >= 1")
        _check(self.max_weight_lag >= 0, f"{prefix}.max_weight_lag", "must be >= 0")
        _check(self.bucket_mb >= 1, f"{prefix}.bucket_mb", "must be >= 1")
        _check(self.server_tp_size >= 1, f"{prefix}.server_tp_size", "must be >= 1")
        _check(self.mode == "sync" or not self.offload_during_train, f"{prefix}.mode",
               f"{self.mode} generates while the trainer trains, but rollout.offload_during_train (colocated "
               "GPUs) gives the engine's memory to the trainer during training: use rollout.mode=sync there")
        _check(self.max_staleness >= 1, f"{prefix}.max_staleness",
               f"must be >= 1 (the versions a trained token may lag the policy; got {self.max_staleness})")


@dataclass
class VicraConfig:
    """Spec section 3."""

    # the score is prob_diff (spec section 3's default); the kl variant needs both passes' full
    # next-token distributions at every response token (algorithms/vicra.py::kl_scores is the
    # formula, not wired into the trainer)
    enabled: bool = False
    distortion: Literal["discard", "blacken", "patch_blacken", "gaussian_noise", "gaussian_blur"] = "discard"
    patch_ratio: float = 0.6
    noise_std: float = 200.0
    blur_radius: float = 5.0
    grounded_threshold: float = 0.2
    # the no-image pass skips responses whose advantage is 0: their shaped advantage A * psi(w)
    # is 0 whatever w is (the loss is unchanged); the vicra/* diagnostics then cover the scored
    # responses (vicra/scored_share says how many tokens that is)
    skip_zero_advantage: bool = True


@dataclass
class IvrConfig:
    """Spec section 4."""

    enabled: bool = False
    tau: float = 1.0
    max_rectified: int = 2  # K
    max_rounds: int = 3
    gamma: float = 0.1
    rectify_with: Literal["image", "description"] = "image"
    critique_max_new_tokens: int = 128


# ``algorithm.name: dapo`` is a preset: DAPO's settings of spec section 2 for every one of these
# keys that the config does not set itself (config/loader.py applies it; ``grpo`` is the
# dataclass defaults). An explicit key always wins.
DAPO_PRESET = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.0, "loss_agg": "token-mean", "dynamic_sampling": True,
               "overlong_shaping": True}


@dataclass
class AlgorithmConfig:
    """Spec section 2 (GRPO/DAPO); VICRA and IVR-R1 nest here. ``name`` selects the preset
    (``DAPO_PRESET``) and labels the run."""

    name: Literal["grpo", "dapo"] = "grpo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    adv_eps: float = 1e-6
    normalize_by_std: bool = True
    tis_cap: Optional[float] = 2.0  # C of spec 2's truncated importance weight; null: no TIS correction
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    overlong_shaping: bool = False
    overlong_cache: int = 32
    # MoE (docs/models.md, "Routing replay"): off; record: the engine returns the experts it
    # chose per token and layer, and the trainer reports how often its own choice differs
    # (routing/mismatch); replay: the trainer's passes with the image (old, training, reference
    # log-probs) also route those tokens to the engine's experts
    routing_replay: Literal["off", "record", "replay"] = "off"
    vicra: VicraConfig = field(default_factory=VicraConfig)
    ivr: IvrConfig = field(default_factory=IvrConfig)

    def validate(self, prefix: str = "algorithm") -> None:
        _check(0 <= self.eps_low < 1, f"{prefix}.eps_low", "must be in [0, 1)")
        _check(self.eps_high >= 0, f"{prefix}.eps_high", "must be >= 0")
        _check(self.beta >= 0, f"{prefix}.beta", "must be >= 0")
        _check(self.tis_cap is None or self.tis_cap >= 1, f"{prefix}.tis_cap", "must be >= 1, or null (no TIS)")
        _check(self.ivr.max_rectified >= 0, f"{prefix}.ivr.max_rectified", "must be >= 0")
        _check(self.ivr.max_rounds >= 1, f"{prefix}.ivr.max_rounds", "must be >= 1")
        _check(self.ivr.gamma > 0, f"{prefix}.ivr.gamma", "must be > 0")
        _check(0 < self.vicra.patch_ratio <= 1, f"{prefix}.vicra.patch_ratio", "must be in (0, 1]")
        _check(-1 <= self.ivr.tau <= 1, f"{prefix}.ivr.tau",
               f"must be in [-1, 1] (rewards lie in [-1, 1] with DAPO's overlong shaping, [0, 1] without; above "
               f"1 no rewrite could ever be accepted), got {self.ivr.tau}")
        _check(self.ivr.critique_max_new_tokens >= 1, f"{prefix}.ivr.critique_max_new_tokens", "must be >= 1")
        _check(self.adv_eps > 0, f"{prefix}.adv_eps", "must be > 0")
        _check(self.max_sampling_rounds >= 1, f"{prefix}.max_sampling_rounds", "must be >= 1")
        _check(self.overlong_cache >= 0, f"{prefix}.overlong_cache", "must be >= 0")
        _check(self.vicra.noise_std >= 0, f"{prefix}.vicra.noise_std", "must be >= 0")
        _check(self.vicra.blur_radius >= 0, f"{prefix}.vicra.blur_radius", "must be >= 0")


@dataclass
class ParallelismConfig:
    """Megatron layout; data-parallel size is derived from the world size."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # mixture-of-experts models: the experts split over this many ranks of the data-parallel
    # group (megatron-core's expert model parallelism); 1 for dense models
    expert_parallel: int = 1
    # mixture-of-experts models: each expert's MLP split over this many ranks, like the dense MLPs
    # over tensor_parallel (megatron-core's expert tensor parallelism); 1: every expert whole on its
    # rank. expert_parallel x expert_tensor_parallel must divide the processes of a pipeline stage
    expert_tensor_parallel: int = 1
    # (context parallelism is not supported for Qwen-VL yet: docs/models.md)
    fp8: Optional[Literal["delayed", "blockwise"]] = None

    def validate(self, prefix: str = "parallel") -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "expert_parallel", "expert_tensor_parallel"):
            _check(getattr(self, name) >= 1, f"{prefix}.{name}", "must be >= 1")


LrSchedule = Literal["constant", "linear", "cosine"]


class OptimizerFields(Protocol):
    """The optimizer and learning-rate schedule fields that :class:`TrainerConfig` (RL) and
    :class:`SftConfig` both carry; the runtime's optimizer takes either config as it is
    (``model_providers/optimizer.py``, ``policy.py``)."""

    lr: float
    min_lr: float
    lr_warmup_steps: int
    lr_schedule: LrSchedule
    weight_decay: float
    grad_clip: float


def _check_optimizer(cfg: OptimizerFields, prefix: str) -> None:
    _check(cfg.lr > 0, f"{prefix}.lr", f"must be > 0, got {cfg.lr}")
    _check(0 <= cfg.min_lr <= cfg.lr, f"{prefix}.min_lr", "must be in [0, lr]")
    _check(cfg.lr_warmup_steps >= 0, f"{prefix}.lr_warmup_steps", "must be >= 0")
    _check(cfg.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    _check(cfg.grad_clip >= 0, f"{prefix}.grad_clip", f"must be >= 0 (0: no clipping), got {cfg.grad_clip}")


@dataclass
class TrainerConfig:
    """The RL trainer (``megatron-ivr train``); ``lr`` etc. are the optimizer's for RL."""

    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_schedule: LrSchedule = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    steps: int = 10
    prompts_per_step: int = 8
    mini_batches: int = 1  # optimizer steps per RL step (the step's groups split evenly)
    max_tokens_per_micro_batch: int = 4096  # padded tokens (rows x longest) per micro-batch
    # a group's responses share one copy of their prompt and image in a row (exact; local attention spec)
    share_prompts: bool = True
    # > 0: a shared-prompt row holds at most this many tokens (larger groups are split, each part
    # with its own prompt copy); attention runs block by block, so whole groups (0) are usually fastest
    shared_row_tokens: int = 0
    # > 0: several groups/sequences share rows of this many tokens (block-diagonal mask on the local
    # spec; on Transformer Engine the micro-batch's sequences go in one THD row split by cu_seqlens)
    pack_length: int = 0
    # how packed rows separate their sequences: "mask" (block-diagonal mask, local spec), "thd"
    # (Transformer Engine's cu_seqlens; on the local spec a mask built from them: the TE layout
    # on a CPU), "auto" (thd on TE layers, mask otherwise)
    packed_format: Literal["auto", "mask", "thd"] = "auto"
    # a separate old-log-prob pass even with one mini-batch, where the training forward's own are exact
    recompute_old_logprobs: bool = False
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = 1  # torch threads per process on CPU (tiny models: 1 is fastest)
    export_dir: Optional[str] = "runs/demo/rl/hf"  # the final policy as an HF folder (None: no export)

    def validate(self, prefix: str = "trainer") -> None:
        _check_optimizer(self, prefix)
        _check(self.steps >= 0, f"{prefix}.steps", "must be >= 0")
        _check(self.prompts_per_step >= 1, f"{prefix}.prompts_per_step", "must be >= 1")
        _check(1 <= self.mini_batches <= self.prompts_per_step, f"{prefix}.mini_batches",
               f"must be in [1, prompts_per_step={self.prompts_per_step}], got {self.mini_batches}")
        _check(self.max_tokens_per_micro_batch >= 16, f"{prefix}.max_tokens_per_micro_batch", "must be >= 16")
        _check(self.pack_length >= 0, f"{prefix}.pack_length", "must be >= 0 (0: no row packing)")
        _check(self.shared_row_tokens >= 0, f"{prefix}.shared_row_tokens", "must be >= 0 (0: one row per group)")
        _check(self.packed_format != "thd" or (self.pack_length > 0 and not self.share_prompts),
               f"{prefix}.packed_format", "thd packs single sequences into rows: it needs trainer.pack_length > 0 "
               "and trainer.share_prompts=false (THD cannot express a prompt shared by several responses)")
        _check(self.num_threads >= 1, f"{prefix}.num_threads", "must be >= 1")


@dataclass
class SftConfig:
    """SFT cold start (spec section 5; ``megatron-ivr sft``): reference responses, loss on
    response tokens only, same model, layouts, optimizer and checkpoints as RL."""

    init_path: str = "runs/demo/models/qwen2_5_vl_tiny"  # the HF folder SFT starts from
    # rows with a 'reasoning' (or 'response') column, or one-turn chat 'messages'; files are concatenated
    data_paths: list[str] = field(default_factory=lambda: ["runs/demo/data/sft.jsonl"])
    output_dir: str = "runs/demo/sft"  # checkpoints/, logs/ and the exported hf/ folder
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_steps: int = 10
    lr_schedule: LrSchedule = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_interval: int = 0  # 0: only at the end (and on a stop signal)

    def validate(self, prefix: str = "sft") -> None:
        _check(self.steps >= 0, f"{prefix}.steps", "must be >= 0")
        _check(len(self.data_paths) >= 1, f"{prefix}.data_paths", "must name at least one file")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check_optimizer(self, prefix)
        _check(self.save_interval >= 0, f"{prefix}.save_interval", "must be >= 0")


@dataclass
class CheckpointConfig:
    dir: str = "runs/demo/rl/checkpoints"
    save_interval: int = 5  # RL steps between checkpoints (0: only at the end and on a stop signal)
    resume: bool = True  # start from the newest complete checkpoint in dir
    keep_last: int = 2

    def validate(self, prefix: str = "checkpoint") -> None:
        _check(self.save_interval >= 0, f"{prefix}.save_interval", "must be >= 0")
        _check(self.keep_last >= 1, f"{prefix}.keep_last", "must be >= 1")


# the benchmarks ``eval.benchmarks`` may name: one reader each in megatron_ivr/data/benchmarks.py
# (which checks, on import, that it has exactly these)
BENCHMARK_NAMES = ("mathvista", "mathverse", "mathvision", "mmstar", "mmmu", "mmmu_pro", "wemath", "dynamath",
                   "logicvista")


@dataclass
class EvalConfig:
    """``megatron-ivr eval``: greedy accuracy on a split, or on public benchmarks."""

    split: Literal["train", "val", "test"] = "test"
    # name -> file or folder in the benchmark's own layout (megatron_ivr/data/benchmarks.py), e.g.
    # eval.benchmarks.mathvista=/data/MathVista/testmini.parquet; when set, the split is not used
    benchmarks: dict[str, str] = field(default_factory=dict)
    max_samples: Optional[int] = 64  # per suite (None: all)
    batch_size: int = 16
    max_new_tokens: int = 96
    # the secondary panel (megatron_ivr/rewards/statistics.py): k sampled responses per question at
    # `temperature` give mean@k, maj@k and pass@k beside the blind guesser's pass@k; 0: greedy only
    samples: int = 0
    temperature: float = 1.0
    # also evaluate every suite with each image replaced by an empty one of its most common colour
    # (suite "<name>_blank"): what the policy scores without seeing anything
    blank_images: bool = False

    def validate(self, prefix: str = "eval") -> None:
        _check(self.samples >= 0, f"{prefix}.samples", "must be >= 0 (0: greedy only)")
        _check(self.temperature > 0, f"{prefix}.temperature", "must be > 0 (the greedy headline is always computed)")
        for name in self.benchmarks:
            _check(name in BENCHMARK_NAMES, f"{prefix}.benchmarks", f"unknown benchmark {name!r}; choose from "
                   f"{', '.join(sorted(BENCHMARK_NAMES))}")
        _check(self.max_samples is None or self.max_samples >= 1, f"{prefix}.max_samples", "must be >= 1 or null")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")


@dataclass
class LoggingConfig:
    dir: str = "runs/demo/rl/logs"  # metrics.jsonl (always written: the report reads it), one record a step
    tensorboard: bool = False
    wandb: bool = False  # needs `pip install wandb`; project = wandb_project, run name = name
    wandb_project: str = "megatron-ivr"
    progress: bool = True  # a progress line per step on a terminal (in place); elsewhere one every 10 s


Placement = Literal["colocated", "disaggregated"]


@dataclass
class LaunchConfig:
    """How ``megatron-ivr launch {local,slurm,docker}`` places the run (launch/, docs/cluster.md).

    *colocated*: every node runs its SGLang server(s) and its trainer ranks on the same GPUs;
    the servers release their memory while the trainer trains. *disaggregated*: a Slurm
    heterogeneous job, ``rollout_nodes`` nodes of SGLang servers and ``nodes`` trainer nodes.
    """

    job_name: str = "megatron-ivr"
    job_dir: str = "runs/launch"  # where nemo-run writes the job folders (scripts, logs, run config)
    placement: Placement = "colocated"
    nodes: int = 1  # trainer nodes
    gpus_per_node: int = 8  # trainer processes per node (on CPU: processes for `launch local`)
    rollout_nodes: int = 0  # disaggregated only: nodes of SGLang servers
    servers_per_node: int = 1  # SGLang servers per node; each gets gpus_per_node / servers_per_node GPUs
    server_port: int = 30000  # the first server of a node; the next ones count up
    server_host: str = "127.0.0.1"  # bind address; servers read from other nodes need 0.0.0.0 (+ rollout.api_key)
    server_mem_fraction: Optional[float] = None  # SGLang --mem-fraction-static (colocated: leave room to train)
    server_args: list[str] = field(default_factory=list)  # more `sglang.launch_server` flags
    server_startup_timeout_s: int = 1200
    sglang_python: str = "/opt/sglang/bin/python"  # the SGLang environment in the image (local: auto)
    master_port: int = 29500  # torchrun rendezvous port on the trainer head node
    container_image: Optional[str] = None  # Slurm (Pyxis) / Docker image
    container_mounts: list[str] = field(default_factory=list)  # "host:container" pairs
    env: dict[str, str] = field(default_factory=dict)  # exported to every process of the job
    account: Optional[str] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"
    exclusive: bool = True
    preempt_signal_s: int = 300  # SIGTERM this many seconds before the time limit: the trainer saves
    max_requeues: int = 5  # a run stopped before its last step (time limit, preemption) is requeued
    ssh_host: Optional[str] = None  # submit through SSH (None: sbatch on this machine)
    ssh_user: Optional[str] = None
    remote_job_dir: Optional[str] = None  # the job folder on the cluster when submitting over SSH

    def validate(self, prefix: str = "launch") -> None:
        _check(self.nodes >= 1, f"{prefix}.nodes", "must be >= 1")
        _check(self.gpus_per_node >= 1, f"{prefix}.gpus_per_node", "must be >= 1")
        _check(self.servers_per_node >= 1, f"{prefix}.servers_per_node", "must be >= 1")
        _check(self.gpus_per_node % self.servers_per_node == 0, f"{prefix}.servers_per_node",
               f"must divide gpus_per_node={self.gpus_per_node}, got {self.servers_per_node}")
        _check(self.rollout_nodes >= 0, f"{prefix}.rollout_nodes", "must be >= 0")
        _check(self.placement == "colocated" or self.rollout_nodes >= 1, f"{prefix}.rollout_nodes",
               "placement=disaggregated needs rollout_nodes >= 1")
        _check(self.server_mem_fraction is None or 0 < self.server_mem_fraction < 1,
               f"{prefix}.server_mem_fraction", "must be in (0, 1)")
        _check(self.preempt_signal_s >= 0, f"{prefix}.preempt_signal_s", "must be >= 0")
        _check(self.max_requeues >= 0, f"{prefix}.max_requeues", "must be >= 0")
        for mount in self.container_mounts:
            _check(":" in mount, f"{prefix}.container_mounts", f"{mount!r} must look like host_path:container_path")
        _check(self.ssh_host is None or self.remote_job_dir is not None, f"{prefix}.remote_job_dir",
               "is needed with launch.ssh_host (the job folder on the cluster)")


@dataclass
class RunConfig:
    """The whole run: what ``megatron-ivr config show`` prints."""

    name: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tiny_model: TinyModelConfig = field(default_factory=TinyModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    parallel: ParallelismConfig = field(default_factory=ParallelismConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def validate(self) -> None:
        _check_finite(self, "")
        for name in self.__dataclass_fields__:
            component = getattr(self, name)
            if hasattr(component, "validate"):
                component.validate(name)
        _check(self.algorithm.routing_replay == "off" or self.rollout.backend == "local", "algorithm.routing_replay",
               f"{self.algorithm.routing_replay} needs the local engine's expert choices; the SGLang client does not "
               "ask SGLang for them yet (docs/models.md, \"Routing replay\"): set algorithm.routing_replay=off")


def _check_finite(node, prefix: str) -> None:
    """Every float in the config is finite (``trainer.lr=inf``, ``reward.grader_timeout_s=nan``
    pass a ``> 0`` check and then break a run, or make a time limit never fire)."""
    for name in node.__dataclass_fields__:
        value = getattr(node, name)
        if hasattr(value, "__dataclass_fields__"):
            _check_finite(value, f"{prefix}{name}.")
        elif isinstance(value, float):
            _check(math.isfinite(value), f"{prefix}{name}", f"must be a finite number, got {value}")
