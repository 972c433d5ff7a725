"""The ``megatron-ivr`` command.

Every subcommand takes a config (YAML, with ``defaults:``; ``--config FILE`` or, for sft,
train and launch, the first positional argument) and trailing dotted overrides such as
``trainer.lr=1e-6``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path


def _config(args):
    from megatron_ivr.config import load_config

    return load_config(args.config, args.overrides)


def cmd_config_show(args) -> int:
    from megatron_ivr.config import dump_config

    print(dump_config(_config(args)), end="")
    return 0


def cmd_data_synth(args) -> int:
    from megatron_ivr.data.synthetic import generate_dataset

    cfg = _config(args)

    def progress(split, done, total):
        if done == total or done % 256 == 0:
            print(f"synth {split}: {done}/{total}", flush=True)

    manifest = generate_dataset(cfg.synthetic, template=cfg.reward.template, progress=progress)
    out = Path(cfg.synthetic.output_dir)
    print(f"wrote {out}: families per split {manifest['families']}, "
          f"{manifest['rereasoning_examples']} re-reasoning examples")
    return 0


def cmd_data_inspect(args) -> int:
    from megatron_ivr.data import read_dataset

    dataset = read_dataset(args.path, max_bad_fraction=1.0)
    print(f"{args.path}: {len(dataset.samples)} good, {len(dataset.bad)} bad")
    for bad in dataset.bad:
        print(f"  bad {bad.id}: {bad.reason}")
    return 0


def cmd_data_learnability(args) -> int:
    from megatron_ivr.data.learnability import write_learnability_pool

    counts = write_learnability_pool(args.samples, args.prompts, args.out, args.size, args.seed,
                                     args.by_family)
    print(f"wrote {args.out}: {counts['rows']} rows drawn from {counts['distinct']} distinct prompts of "
          f"{counts['prompts']} evaluated ({counts['never_solved']} never solved, {counts['always_solved']} "
          "always solved: weight 0)")
    for family, entry in sorted(counts["families"].items()):
        print(f"  {family}: {entry['prompts']} prompts, pass rate {entry['pass_rate']:.3f}, "
              f"{entry['pool_share']:.1%} of the pool")
    return 0


def cmd_model_tiny(args) -> int:
    from megatron_ivr.data.synthetic.generate import synthetic_corpus
    from megatron_ivr.models.tiny import make_tiny_model
    from megatron_ivr.models.tokenizer import qwen_vocabulary_tokenizer, train_bpe_tokenizer

    cfg = _config(args)
    cfg.tiny_model.validate()
    if cfg.tiny_model.tokenizer == "bpe":
        tokenizer = train_bpe_tokenizer(synthetic_corpus(cfg.synthetic), cfg.tiny_model.vocab_size)
    else:
        tokenizer = qwen_vocabulary_tokenizer()
    for family in cfg.tiny_model.families:
        path = make_tiny_model(family, cfg.tiny_model, tokenizer, Path(cfg.tiny_model.output_dir) / f"{family}_tiny",
                               cfg.data.min_pixels, cfg.data.max_pixels)
        print(f"wrote {path}")
    return 0


def cmd_eval(args) -> int:
    from megatron_ivr.evaluation import evaluate

    cfg = _config(args)
    tty = sys.stdout.isatty()

    def progress(line: str) -> None:  # a bar rewritten in place on a terminal, plain lines otherwise
        count = re.search(r"(\d+)/(\d+) samples", line)
        done = count is not None and count.group(1) == count.group(2)
        print("\r" + line if tty else line, end="\n" if (done or not tty) else "", flush=True)

    summary = evaluate(cfg, progress=progress)
    for name in cfg.eval.benchmarks or [cfg.eval.split]:
        prefix = f"eval/{name}"
        print(f"{prefix}: accuracy={summary[prefix + '/accuracy']:.3f} format={summary[prefix + '/format']:.3f} "
              f"reward={summary[prefix + '/reward']:.3f} over {summary[prefix + '/count']} samples")
    print(f"table: {Path(cfg.logging.dir) / 'eval_summary.md'}")
    return 0


def cmd_convert(args) -> int:
    from megatron_ivr.model_providers.convert import hf_to_megatron, megatron_to_hf

    if args.direction == "hf-to-megatron":
        out = hf_to_megatron(args.src, args.out, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, dtype=args.dtype,
                             writers=args.writers,
                             overwrite=args.overwrite)
    else:
        out = megatron_to_hf(args.src, args.out, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
                             overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_sft(args) -> int:
    from megatron_ivr.training.train import run_sft

    return run_sft(_config(args))


def cmd_train(args) -> int:
    from megatron_ivr.training.train import run_rl

    return run_rl(_config(args))


def cmd_report(args) -> int:
    from megatron_ivr.report import compare_runs, write_report

    if len(args.run_dir) == 1 and not args.metric:
        out = write_report(args.run_dir[0], args.out)
    else:
        if not args.metric or not args.out:
            raise SystemExit("report: comparing runs needs --metric (one or more) and --out")
        runs = dict(item.split("=", 1) if "=" in item else (Path(item).name, item) for item in args.run_dir)
        out = compare_runs(runs, args.metric, args.out)
        print(Path(out).read_text())
    print(f"wrote {out}")
    return 0


def cmd_ablate(args) -> int:
    from megatron_ivr.ablate import ablate

    seeds = [int(s) for s in args.seeds.split(",")]
    print(ablate(args.config, args.overrides, args.arms.split(","), seeds, Path(args.out), args.jobs,
                 progress=lambda line: print(line, flush=True)))
    return 0


def cmd_launch(args) -> int:
    from megatron_ivr.launch.launcher import launch

    return launch(args.mode, _config(args), dryrun=args.dryrun, command=args.run)


def _add_config_args(parser: argparse.ArgumentParser, positional_config: bool = False) -> None:
    if positional_config:
        parser.add_argument("config", nargs="?", help="YAML config file")
    else:
        parser.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-6")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-ivr", description=(
        "RL post-training of Qwen-VL models with IVR-R1 and VICRA on Megatron-Core."))
    parser.add_argument("--log-level", default="WARNING", help="Python logging level")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (default: one line)")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect configurations")
    config_sub = config.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser("show", help="print the resolved config")
    _add_config_args(show, positional_config=True)
    show.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="datasets: make the synthetic task, inspect files")
    data_sub = data.add_subparsers(dest="action", required=True)
    synth = data_sub.add_parser("synth", help="generate the synthetic visual-reasoning task")
    _add_config_args(synth)
    synth.set_defaults(func=cmd_data_synth)
    inspect = data_sub.add_parser("inspect", help="validate a JSONL/Parquet dataset and list bad samples")
    inspect.add_argument("path")
    inspect.set_defaults(func=cmd_data_inspect)
    learnable = data_sub.add_parser(
        "learnability", help="an RL prompt pool drawn with weight p(1-p) from a policy's pass rates",
        description="Write an RL prompt pool of SIZE prompts drawn with replacement, each with weight "
                    "p(1-p), p its pass rate in SAMPLES (megatron-ivr eval with eval.split=train, "
                    "eval.samples=k, from the policy RL starts from). Train on it with data.train_path=OUT.")
    learnable.add_argument("samples", help="eval_train_samples.jsonl written by megatron-ivr eval")
    learnable.add_argument("prompts", help="the prompt file that was evaluated (data.train_path)")
    learnable.add_argument("--out", required=True, help="the pool to write (JSONL)")
    learnable.add_argument("--size", type=int, required=True, help="prompts to draw")
    learnable.add_argument("--seed", type=int, default=0, help="seed of the draw")
    learnable.add_argument("--by-family", action="store_true",
                           help="weight within each family; each family keeps its share of the prompts")
    learnable.set_defaults(func=cmd_data_learnability)

    model = sub.add_parser("model", help="models: make tiny random Qwen-VL checkpoints")
    model_sub = model.add_subparsers(dest="action", required=True)
    tiny = model_sub.add_parser("tiny", help="write tiny Qwen2.5-VL / Qwen3-VL folders in HF format")
    _add_config_args(tiny)
    tiny.set_defaults(func=cmd_model_tiny)

    evaluate = sub.add_parser(
        "eval", help="greedy evaluation with the task reward (a split, or public benchmarks)",
        description="Greedy accuracy of model.path (an HF folder, or a Megatron checkpoint of this system, "
                    "converted on the fly) on eval.split, or on the benchmarks in eval.benchmarks "
                    "(name=path: mathvista, mathverse, mathvision, mmstar, mmmu, mmmu_pro, wemath, dynamath, "
                    "logicvista; docs/evaluation.md). Per-sample records, metrics.jsonl and eval_summary.md go "
                    "to logging.dir.")
    _add_config_args(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    convert = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron",
                             description="Convert checkpoints. hf-to-megatron writes a megatron-core distributed "
                                         "checkpoint saved at --tp/--pp (it loads at any layout); megatron-to-hf loads "
                                         "at --tp/--pp and writes a Hugging Face folder.")
    convert.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    convert.add_argument("src", help="source folder")
    convert.add_argument("out", help="output folder: a new one (written in a staging folder, then renamed in); an "
                                     "existing non-empty one only with --overwrite, and only if it is an earlier "
                                     "output of the same kind; never SRC, inside it or above it")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace OUT if it holds an earlier output of the same kind (the new one swapped in "
                              "atomically, then the old one deleted)")
    convert.add_argument("--tp", type=int, default=1,
                         help="tensor-parallel size (processes = pp * lcm(tp, ep * etp))")
    convert.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    convert.add_argument("--ep", type=int, default=1,
                         help="expert-parallel size, mixture-of-experts models")
    convert.add_argument("--etp", type=int, default=1,
                         help="expert-tensor-parallel size, mixture-of-experts models: each expert over etp ranks")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                         help="parameter dtype of the Megatron checkpoint")
    convert.add_argument("--writers", type=int, default=4,
                         help="hf-to-megatron: writer processes per rank (megatron-core's default is 2; raise it for "
                              "storage that rewards parallel writes)")
    convert.set_defaults(func=cmd_convert)

    launch_note = ("Alone it runs one process; under torchrun (`torchrun --nproc_per_node N $(which megatron-ivr) "
                   "...`) any TP x PP x DP, DP = N / (TP x PP). Resumes from the newest complete checkpoint; "
                   "SIGTERM/SIGINT save and exit 0.")
    sft = sub.add_parser("sft", help="SFT cold start on reference responses (spec section 5)",
                         description="Supervised fine-tuning on reference responses (sft.data_paths), loss on "
                                     "response tokens only; writes checkpoints, metrics and the fine-tuned HF "
                                     "folder under sft.output_dir. " + launch_note)
    _add_config_args(sft, positional_config=True)
    sft.set_defaults(func=cmd_sft)
    train = sub.add_parser("train", help="RL training (GRPO/DAPO + VICRA + IVR-R1)",
                           description="RL training of model.path with the algorithm section (GRPO/DAPO, "
                                       "algorithm.vicra, algorithm.ivr); metrics in logging.dir, checkpoints in "
                                       "checkpoint.dir, the final policy in trainer.export_dir. " + launch_note)
    _add_config_args(train, positional_config=True)
    train.set_defaults(func=cmd_train)
    report = sub.add_parser("report", help="plot a run's metrics and write a markdown summary",
                            description="Reads RUN_DIR/metrics.jsonl (or RUN_DIR/logs/metrics.jsonl), draws the "
                                        "curves to PNG and writes report.md beside them. With several runs "
                                        "(LABEL=RUN_DIR or RUN_DIR) and --metric: their curves side by side "
                                        "in OUT/compare.png and OUT/compare.md.")
    report.add_argument("run_dir", nargs="+")
    report.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    report.add_argument("--metric", action="append", default=[],
                        help="compare runs on this metric key (repeatable), e.g. reward/accuracy/union")
    report.set_defaults(func=cmd_report)

    from megatron_ivr.ablate import ARMS, DEFAULT_ARMS

    ablate = sub.add_parser(
        "ablate", help="the papers' comparison in miniature: RL arms x seeds from one SFT policy",
        description="From the SFT policy at model.path and with the config's step budget, train every arm "
                    "(megatron-ivr train) for every seed, evaluate it greedily on the test split (megatron-ivr "
                    "eval), and print a table of accuracy per question family (mean +- std over seeds; the "
                    "held-out family included); OUT/results.md and OUT/accuracy.png keep it. Arms: "
                    + ", ".join(ARMS) + f". Default: {','.join(DEFAULT_ARMS)}. Finished runs are not repeated.")
    _add_config_args(ablate, positional_config=True)
    ablate.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated arms")
    ablate.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (trainer.seed)")
    ablate.add_argument("--out", default="runs/ablate", help="output folder (default runs/ablate)")
    ablate.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    ablate.set_defaults(func=cmd_ablate)

    launch = sub.add_parser(
        "launch", help="launch a run with nemo-run: local (torchrun here), slurm, docker",
        description="Launch `megatron-ivr train` (or sft) through nemo-run. local: torchrun with "
                    "launch.gpus_per_node processes on this machine (starting SGLang servers when "
                    "rollout.backend=sglang has no server_urls). slurm: launch.placement=colocated (servers and "
                    "trainer share every node's GPUs) or disaggregated (a heterogeneous job: launch.rollout_nodes "
                    "of SGLang servers, launch.nodes of trainer); SIGTERM launch.preempt_signal_s before the time "
                    "limit, save, requeue, resume. docker: one GPU machine. The resolved config is written to "
                    "launch.job_dir/<job_name>/<time>/run_config.yaml. Needs the `launch` extra (nemo-run). "
                    "See docs/cluster.md.")
    launch.add_argument("mode", choices=["local", "slurm", "docker"])
    _add_config_args(launch, positional_config=True)
    launch.add_argument("--dryrun", action="store_true",
                        help="render the scripts (sbatch, node scripts), submit nothing")
    launch.add_argument("--run", default="train", choices=["train", "sft"], help="what to run (default: train)")
    launch.set_defaults(func=cmd_launch)
    return parser


EXIT_CONFIG = 2  # a config key, a command-line argument or an output folder is refused
EXIT_DATA = 1  # a data file, checkpoint or model folder cannot be used


def _failure(exc: BaseException) -> tuple[int, str]:
    """Exit code and one line for an error that ends a command (docs/reliability.md)."""
    from megatron_ivr.config import ConfigError
    from megatron_ivr.data import DataError
    from megatron_ivr.model_providers.manifest import CheckpointRefused
    from megatron_ivr.model_providers.state_dict_adapter import ConversionError

    if isinstance(exc, ConfigError):
        return EXIT_CONFIG, f"error: {exc}"
    if isinstance(exc, (DataError, CheckpointRefused, ConversionError)):
        return EXIT_DATA, f"error: {exc}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return EXIT_DATA, f"error: {exc.filename}: {exc.strerror or exc}"
    return EXIT_DATA, f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    # megatron-core warns at import about optional GPU libraries (TE, Apex) that a CPU run never uses
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*\.grad attribute of a Tensor that is not a leaf.*")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as exc:  # one clear line; the traceback only when asked for
        if args.debug:
            raise
        code, line = _failure(exc)
        print(line, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
