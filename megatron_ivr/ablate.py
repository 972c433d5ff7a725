"""``megatron-ivr ablate``: the papers' comparison in miniature, on the synthetic task.

From one SFT policy (``model.path``) and with one step budget, each *arm* trains with RL
(``megatron-ivr train``, its own folders) for every seed, then its policy is evaluated
greedily on the test split (``megatron-ivr eval``); the SFT policy itself is the ``sft``
arm. Two control arms spend RL's budget without RL, from the same policy:

- ``sft-more``: SFT continued on the configured SFT data (``sft.data_paths``) for as many
  sequences as RL trains on (steps x prompts x rollout.n), at the SFT's final learning rate;
- ``rft``: one round of rejection-sampling fine-tuning on RL's prompt pool: ``rollout.n``
  samples at the rollout temperature on as many prompts as RL draws, the accepted ones kept
  (:mod:`megatron_ivr.data.rejection_sampling`) and trained on for the same budget.

A ``model.path`` holding ``{seed}`` names one SFT policy per seed (``make demo-check``: the
whole pipeline repeated per seed); the ``sft`` arm is then evaluated per seed too.

The result is a table per metric (greedy accuracy, accuracy macro-averaged over gold
answers, and with ``eval.blank_images`` the blank-image control), one column per question
family (the held-out family included), mean +- std over seeds, with IVR-R1's accepted
rewrites per step; printed and written with a plot to ``OUT/results.md`` and
``OUT/accuracy.png``. Runs go through the CLI in subprocesses (``--jobs`` at a time, one
thread each); a run whose evaluation exists is not repeated, so an interrupted ablation
continues where it stopped.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_ivr.config import load_config
from megatron_ivr.data.rejection_sampling import write_accepted
from megatron_ivr.metrics import read_metrics

# arm -> overrides on top of the config (the algorithm section is set completely by each arm)
_OFF = ["algorithm.vicra.enabled=false", "algorithm.ivr.enabled=false", "algorithm.dynamic_sampling=false",
        "algorithm.overlong_shaping=false"]
_DAPO = ["algorithm.name=dapo", "algorithm.dynamic_sampling=true", "algorithm.overlong_shaping=true",
         "algorithm.eps_high=0.28"]
ARMS: dict[str, list[str]] = {
    "sft": [],  # no RL: the starting policy
    "grpo": [*_OFF, "algorithm.name=grpo"],
    "grpo+vicra": [*_OFF, "algorithm.name=grpo", "algorithm.vicra.enabled=true"],
    "dapo": [*_OFF, *_DAPO],
    "dapo+vicra": [*_OFF, *_DAPO, "algorithm.vicra.enabled=true"],
    "ivr-r1": [*_OFF, "algorithm.name=grpo", "algorithm.ivr.enabled=true"],
    "ivr-r1+vicra": [*_OFF, "algorithm.name=grpo", "algorithm.ivr.enabled=true", "algorithm.vicra.enabled=true"],
    # the papers' other ablations (not in the default set)
    "grpo+vicra-blacken": [*_OFF, "algorithm.name=grpo", "algorithm.vicra.enabled=true",
                           "algorithm.vicra.distortion=blacken"],
    "grpo+vicra-noise": [*_OFF, "algorithm.name=grpo", "algorithm.vicra.enabled=true",
                         "algorithm.vicra.distortion=gaussian_noise"],
    "ivr-r1-k1": [*_OFF, "algorithm.name=grpo", "algorithm.ivr.enabled=true", "algorithm.ivr.max_rectified=1"],
    "ivr-r1-k4": [*_OFF, "algorithm.name=grpo", "algorithm.ivr.enabled=true", "algorithm.ivr.max_rectified=4"],
    "ivr-r1-description": [*_OFF, "algorithm.name=grpo", "algorithm.ivr.enabled=true",
                           "algorithm.ivr.rectify_with=description"],
}
CONTROL_ARMS = ("sft-more", "rft")  # RL's budget spent on SFT (see the module docstring)
ARMS.update({arm: [] for arm in CONTROL_ARMS})
DEFAULT_ARMS = ["sft", "grpo", "grpo+vicra", "dapo", "dapo+vicra", "ivr-r1", "ivr-r1+vicra"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_ivr.cli", *args]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS="1")


def _run(command: list[str], log: Path) -> None:
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(command) + "\n")
        fh.flush()
        result = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=_env())
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:5])} failed with {result.returncode}; see {log}")


def run_arm(config: str, overrides: list[str], arm: str, seed: int, out: Path) -> dict:
    """Train (unless ``sft``) and evaluate one arm at one seed; returns the evaluation summary."""
    folder = out / arm / f"seed{seed}"
    summary_file = folder / "eval" / "summary.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    start = time.time()
    policy = _model_path(config, overrides).replace("{seed}", str(seed))
    overrides = [*overrides, f"model.path={policy}"]
    if arm in CONTROL_ARMS:
        policy = _run_control(config, overrides, arm, seed, folder, log)
    elif arm != "sft":
        _run(_cli("train", config, *overrides, *ARMS[arm], f"trainer.seed={seed}",
                  f"checkpoint.dir={folder / 'checkpoints'}", f"logging.dir={folder / 'logs'}",
                  f"trainer.export_dir={folder / 'hf'}", "checkpoint.save_interval=0", "logging.progress=false"),
             log)
        policy = str(folder / "hf")
    _run(_cli("eval", "-c", config, *overrides, f"model.path={policy}", f"logging.dir={folder / 'eval'}",
              "eval.split=test", "eval.samples=0"), log)
    summary = [r for r in read_metrics(folder / "eval" / "metrics.jsonl") if "eval/test/accuracy" in r][-1]
    summary["seconds"] = time.time() - start
    # the last record of each step (a run resumed after a stop logs some steps twice)
    steps = {r["step"]: r for r in read_metrics(folder / "logs" / "metrics.jsonl") if "ivr/accepted" in r} \
        if (folder / "logs" / "metrics.jsonl").exists() else {}
    if steps:
        summary["ivr/accepted_per_step"] = statistics.mean(r["ivr/accepted"] for r in steps.values())
    summary_file.write_text(json.dumps(summary))
    return summary


def _run_control(config: str, overrides: list[str], arm: str, seed: int, folder: Path, log: Path) -> str:
    """``sft-more`` or ``rft`` (module docstring): SFT from ``model.path`` on as many sequences
    as the RL arms train on; returns the trained policy's folder."""
    cfg = load_config(config, overrides)
    sequences = cfg.trainer.steps * cfg.trainer.prompts_per_step * cfg.rollout.n
    steps = max(1, round(sequences / cfg.sft.batch_size))
    data = [f"sft.data_paths=[{','.join(cfg.sft.data_paths)}]"]
    if arm == "rft":
        prompts = cfg.trainer.steps * cfg.trainer.prompts_per_step
        _run(_cli("eval", "-c", config, *overrides, f"logging.dir={folder / 'samples'}", "eval.split=train",
                  f"eval.max_samples={prompts}", f"eval.samples={cfg.rollout.n}",
                  f"eval.temperature={cfg.rollout.temperature}", f"eval.max_new_tokens={cfg.rollout.max_new_tokens}",
                  "eval.blank_images=false", f"trainer.seed={seed}"), log)
        counts = write_accepted(folder / "samples" / "eval_train_samples.jsonl", cfg.data.train_path,
                                folder / "rft.jsonl")
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"rejection sampling: {counts}\n")
        if not counts["rows"]:
            raise RuntimeError(f"rft: no sampled response on {prompts} prompts was accepted; see {log}")
        data = [f"sft.data_paths=[{folder / 'rft.jsonl'}]", f"data.image_root={Path(cfg.data.train_path).parent}"]
    _run(_cli("sft", config, *overrides, *data, f"sft.init_path={cfg.model.path}", f"sft.output_dir={folder / 'sft'}",
              f"sft.steps={steps}", f"sft.lr={cfg.sft.min_lr}", "sft.lr_schedule=constant", "sft.lr_warmup_steps=0",
              "sft.save_interval=0", f"trainer.seed={seed}", "logging.progress=false"), log)
    return str(folder / "sft" / "hf")


def _model_path(config: str, overrides: list[str]) -> str:
    return load_config(config, overrides).model.path


def aggregate(results: dict[tuple[str, int], dict], arms: list[str], metric: str = "accuracy",
              suite: str = "test") -> tuple[list[str], dict]:
    """(families, {arm: {family: (mean, std, n_questions)}}) of ``metric`` on ``suite`` over seeds."""
    prefix, suffix = f"eval/{suite}/", f"/{metric}"
    families = sorted({k[len(prefix):-len(suffix)] for r in results.values() for k in r
                       if k.startswith(prefix) and k.endswith(suffix) and k.count("/") == 3})
    table = {}
    for arm in arms:
        runs = [r for (a, _), r in results.items() if a == arm]
        row = {}
        for family in ["all", *families]:
            key = f"{prefix}{metric}" if family == "all" else f"{prefix}{family}{suffix}"
            values = [r[key] for r in runs if key in r]
            if values:
                count = runs[0].get(key[:-len(metric)] + "count")
                row[family] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                               count)
        accepted = [r["ivr/accepted_per_step"] for r in runs if "ivr/accepted_per_step" in r]
        if accepted:
            row["ivr/accepted_per_step"] = (statistics.mean(accepted),
                                            statistics.stdev(accepted) if len(accepted) > 1 else 0.0, None)
        table[arm] = row
    return families, table


METRIC_TITLES = {("accuracy", "test"): "Greedy test accuracy",
                 ("accuracy_macro", "test"): "Greedy test accuracy macro-averaged over gold answers",
                 ("accuracy", "test_blank"): "Greedy test accuracy with every image blanked (the image control)"}


def markdown(families: list[str], table: dict, seeds: list[int], title: str = "Greedy test accuracy") -> str:
    columns = ["all", *families]
    counts = next(iter(table.values()))
    header = " | ".join(f"{c} (n={counts[c][2]})" if c in counts else c for c in columns)
    with_ivr = any("ivr/accepted_per_step" in row for row in table.values())
    lines = [f"| arm | {header} |" + (" IVR-R1 accepted / step |" if with_ivr else ""),
             "| --- |" + " --- |" * (len(columns) + with_ivr)]
    for arm, row in table.items():
        cells = [f"{row[c][0]:.3f} +- {row[c][1]:.3f}" if c in row else "-" for c in columns]
        if with_ivr:
            accepted = row.get("ivr/accepted_per_step")
            cells.append(f"{accepted[0]:.2f} +- {accepted[1]:.2f}" if accepted else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{title}, mean +- std over seeds {seeds} (sample std; unless model.path names one SFT policy "
                 "per seed, the sft row is one evaluation of the common starting policy).")
    return "\n".join(lines)


def plot(families: list[str], table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["all", *families]
    arms = list(table)
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(columns)), 4.5))
    for i, arm in enumerate(arms):
        xs = [j + i * width for j in range(len(columns))]
        means = [table[arm].get(c, (0, 0, 0))[0] for c in columns]
        stds = [table[arm].get(c, (0, 0, 0))[1] for c in columns]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=arm)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))], columns)
    ax.set_ylabel("greedy test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ablate(config: str, overrides: list[str], arms: list[str], seeds: list[int], out: Path, jobs: int = 2,
           progress=print) -> str:
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    template = _model_path(config, overrides)
    for seed in seeds:
        policy = Path(template.replace("{seed}", str(seed)))
        if not (policy / "config.json").exists():
            raise FileNotFoundError(f"model.path={policy}: no SFT policy there; run `megatron-ivr sft {config}` "
                                    "(or the first steps of `make demo`) first")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # with one SFT policy for all seeds, the SFT arm does not depend on the seed: evaluated once
    per_seed = "{seed}" in template
    work = [(arm, seed) for seed in seeds for arm in arms if arm != "sft" or per_seed or seed == seeds[0]]
    results: dict[tuple[str, int], dict] = {}

    def one(item):
        arm, seed = item
        summary = run_arm(config, overrides, arm, seed, out)
        results[item] = summary
        progress(f"[ablate] {len(results)}/{len(work)} {arm} seed {seed}: test accuracy "
                 f"{summary['eval/test/accuracy']:.3f} ({time.time() - start:.0f}s so far)")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, work))
    sections = []
    for (metric, suite), title in METRIC_TITLES.items():
        families, table = aggregate(results, arms, metric, suite)
        if any("all" in row for row in table.values()):  # e.g. no blank table without eval.blank_images
            sections.append(f"## {title}\n\n" + markdown(families, table, seeds, title))
            if (metric, suite) == ("accuracy", "test"):
                plot(families, table, out / "accuracy.png")
    text = "\n\n".join(sections)
    wall = time.time() - start
    command = "megatron-ivr ablate " + " ".join([config, *overrides])
    (out / "results.md").write_text(f"# Ablation\n\nCommand: `{command}` (arms {arms}, seeds {seeds})\n\n"
                                    f"{text}\n\nWall time: {wall / 60:.1f} min.\n\n![accuracy](accuracy.png)\n")
    return text + f"\nwall time {wall / 60:.1f} min; written to {out / 'results.md'}"
