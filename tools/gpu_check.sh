#!/usr/bin/env bash
# The checks that need a CUDA GPU: the CPU suite cannot run them (docs/training.md says what
# was verified where). One GPU is enough. Each step's output goes to OUT/logs.tgz (<step>.log)
# and a line "<step> rc=<exit code> <seconds>s" to OUT/summary.log; a failing step does not
# stop the rest.
#
#   bash tools/gpu_check.sh [OUT]          # OUT defaults to runs/gpu_check
#
# Needs a CUDA build of torch and this package's dependencies importable (`pip install -e .`,
# or on a machine without package access: wheels of megatron-core, transformers and
# math-verify installed with `pip install --no-index --target DIR` and PYTHONPATH=DIR:$PWD).
#
# Steps: versions -> synthetic data and tiny models -> megatron-core vs transformers parity
# (tests/model_providers/test_parity.py at TP1, the model on CUDA with NCCL, the reference
# on CPU) -> SFT on CUDA -> RL with IVR-R1 + VICRA (checkpoint, then resume) -> bf16 RL ->
# packed rows -> FP8 (with TE) -> HF -> Megatron -> HF round trip (bit-exact) -> greedy evaluation of the SFT and RL policies
# -> Qwen3-VL-MoE (not run on a GPU yet): parity at EP1, RL with routing replay recording the CPU
# engine's experts against the CUDA trainer's (routing/mismatch), and the Transformer Engine spec's
# grouped-GEMM experts where TE is installed (docs/models.md, "What was verified where")
# -> Qwen3.5 (not run on a GPU yet): parity at TP1 (the Gated DeltaNet through FLA where the image
# has it, else the torch reference on CUDA), RL with IVR-R1 + VICRA, and the TE hybrid spec in bf16.
set -u
OUT=${1:-runs/gpu_check}
RUN=runs/gpu_check_run
CFG=configs/demo_cpu.yaml
MIVR="python3 -m megatron_ivr.cli"
rm -rf "$RUN"
LOGS=$RUN/step_logs
mkdir -p "$OUT" "$LOGS"
: > "$OUT/summary.log"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

step() {  # step NAME TIMEOUT_S COMMAND...; ONLY="a b" runs only the steps named
    local name=$1 limit=$2 start rc
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    start=$(date +%s)
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.log"
}

paths=(synthetic.output_dir=$RUN/data data.train_path=$RUN/data/train.jsonl data.val_path=$RUN/data/val.jsonl
       data.test_path=$RUN/data/test.jsonl tiny_model.output_dir=$RUN/models
       sft.init_path=$RUN/models/qwen2_5_vl_tiny "sft.data_paths=[$RUN/data/sft.jsonl]" sft.output_dir=$RUN/sft
       model.path=$RUN/sft/hf checkpoint.dir=$RUN/rl/checkpoints logging.dir=$RUN/rl/logs
       trainer.export_dir=$RUN/rl/hf logging.progress=false trainer.device=cuda)

step versions 60 bash -c "nvidia-smi -L; python3 -c 'import torch, transformers, megatron.core as mc; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0)); \
print(\"transformers\", transformers.__version__, \"megatron-core\", mc.__version__)'"
step data 180 $MIVR data synth -c $CFG "${paths[@]}" synthetic.num_train=400 synthetic.num_val=32 synthetic.num_test=128
step models 120 $MIVR model tiny -c $CFG "${paths[@]}"
step parity 240 python3 -m pytest -q -p no:cacheprovider tests/model_providers/test_parity.py -k tp1
step sft 180 $MIVR sft $CFG "${paths[@]}" sft.steps=40
step train 240 $MIVR train $CFG "${paths[@]}" trainer.steps=4 checkpoint.save_interval=2
step resume 180 $MIVR train $CFG "${paths[@]}" trainer.steps=6 checkpoint.save_interval=2
step train_bf16 180 $MIVR train $CFG "${paths[@]}" model.dtype=bfloat16 trainer.steps=2 \
    checkpoint.dir=$RUN/rl_bf16/checkpoints logging.dir=$RUN/rl_bf16/logs trainer.export_dir=$RUN/rl_bf16/hf
# row packing (with Transformer Engine importable: THD format, cu_seqlens); its step-0 rollout/
# trainer mismatch in the metrics shows whether the packed log-probs are right
step train_packed 180 $MIVR train $CFG "${paths[@]}" trainer.share_prompts=false trainer.pack_length=2048 \
    trainer.steps=2 checkpoint.dir=$RUN/rl_packed/checkpoints logging.dir=$RUN/rl_packed/logs \
    trainer.export_dir=null
# FP8 (delayed scaling) through Transformer Engine, where the image has TE: two RL steps in bf16
# with FP8 GEMMs, rows padded to megatron's FP8 alignment (16); skipped, saying so, without TE
step train_fp8 240 bash -c 'python3 -c "import transformer_engine" 2>/dev/null || \
    { echo "no Transformer Engine: skipped"; exit 0; }; exec "$@"' _ $MIVR train $CFG "${paths[@]}" \
    parallel.fp8=delayed model.dtype=bfloat16 trainer.share_prompts=false trainer.steps=2 \
    checkpoint.dir=$RUN/rl_fp8/checkpoints logging.dir=$RUN/rl_fp8/logs trainer.export_dir=null
step convert 120 bash -c "$MIVR convert hf-to-megatron $RUN/models/qwen2_5_vl_tiny $RUN/convert/megatron && \
$MIVR convert megatron-to-hf $RUN/convert/megatron $RUN/convert/hf && python3 -c '
import sys; from safetensors.torch import load_file
a = load_file(\"$RUN/models/qwen2_5_vl_tiny/model.safetensors\")
b = load_file(\"$RUN/convert/hf/model.safetensors\")
bad = [k for k in a if k not in b or not a[k].equal(b[k])]
print(len(a), \"tensors,\", len(bad), \"differ\", bad[:5]); sys.exit(1 if bad or a.keys() != b.keys() else 0)'"
step eval_sft 120 $MIVR eval -c $CFG "${paths[@]}" logging.dir=$RUN/eval/sft eval.max_samples=128
step eval_rl 120 $MIVR eval -c $CFG "${paths[@]}" model.path=$RUN/rl/hf logging.dir=$RUN/eval/rl eval.max_samples=128
# Qwen3-VL-MoE: the tiny MoE model; parity with transformers at EP1 (the local spec, sequential
# experts); RL in record mode: the in-process engine (CPU) reports its experts and the CUDA trainer
# counts the tokens it routes elsewhere (routing/mismatch in metrics.jsonl); then the same with TE,
# whose spec runs the experts as one grouped GEMM (the adapter names only sequential experts:
# expected to fail loading until it maps TEGroupedMLP's linear_fc1.weight<e> names)
moe=(model.path=$RUN/models/qwen3_vl_moe_tiny model.family=qwen3_vl_moe "tiny_model.families=[qwen3_vl_moe]")
step moe_models 120 $MIVR model tiny -c $CFG "${paths[@]}" "${moe[@]}"
step moe_parity 300 python3 -m pytest -q -p no:cacheprovider tests/model_providers/test_moe_parity.py -k ep1
step moe_train 240 $MIVR train $CFG "${paths[@]}" "${moe[@]}" algorithm.routing_replay=record trainer.steps=2 \
    checkpoint.dir=$RUN/rl_moe/checkpoints logging.dir=$RUN/rl_moe/logs trainer.export_dir=null
step moe_train_te 240 bash -c 'python3 -c "import transformer_engine" 2>/dev/null || \
    { echo "no Transformer Engine: skipped"; exit 0; }; exec "$@"' _ $MIVR train $CFG "${paths[@]}" "${moe[@]}" \
    model.dtype=bfloat16 trainer.share_prompts=false algorithm.routing_replay=replay trainer.steps=2 \
    checkpoint.dir=$RUN/rl_moe_te/checkpoints logging.dir=$RUN/rl_moe_te/logs trainer.export_dir=null
# Qwen3.5: the tiny hybrid model; parity at TP1 (its test builds the model itself); two RL steps on
# the local spec, then in bf16 with TE's hybrid block spec where TE is installed (megatron's
# get_transformer_block_with_experimental_attention_variant_spec with our Gated DeltaNet swapped in)
q35=(model.path=$RUN/models/qwen3_5_tiny model.family=qwen3_5 "tiny_model.families=[qwen3_5]")
step qwen3_5_models 120 $MIVR model tiny -c $CFG "${paths[@]}" "${q35[@]}"
step qwen3_5_parity 300 python3 -m pytest -q -p no:cacheprovider tests/model_providers/test_qwen3_5_parity.py \
    -k "tp1 and not moe"
step qwen3_5_train 240 $MIVR train $CFG "${paths[@]}" "${q35[@]}" trainer.steps=2 \
    checkpoint.dir=$RUN/rl_q35/checkpoints logging.dir=$RUN/rl_q35/logs trainer.export_dir=null
step qwen3_5_train_te 240 bash -c 'python3 -c "import transformer_engine" 2>/dev/null || \
    { echo "no Transformer Engine: skipped"; exit 0; }; exec "$@"' _ $MIVR train $CFG "${paths[@]}" "${q35[@]}" \
    model.dtype=bfloat16 trainer.share_prompts=false trainer.steps=2 \
    checkpoint.dir=$RUN/rl_q35_te/checkpoints logging.dir=$RUN/rl_q35_te/logs trainer.export_dir=null
for run in rl rl_bf16 rl_moe rl_moe_te rl_q35 rl_q35_te; do
    cp "$RUN/$run/logs/metrics.jsonl" "$LOGS/metrics_$run.jsonl" 2>/dev/null
done
for policy in sft rl; do
    cp "$RUN/eval/$policy/eval_summary.md" "$LOGS/eval_$policy.md" 2>/dev/null
done
tar czf "$OUT/logs.tgz" -C "$LOGS" .
cat "$OUT/summary.log"
