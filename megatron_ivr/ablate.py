"""``megatron-ivr ablate``: the papers' comparison in miniature, on the synthetic task.

From one SFT policy (``model.path``) and with one step budget, each *arm* trains with RL
(``megatron-ivr train``, its own folders) for every seed, then its policy is evaluated
greedily on the test split (``megatron-ivr eval``); the SFT policy itself is the ``sft``
arm. The result is a table of test accuracy per question family (the held-out family
included), mean +- std over seeds, printed and written with a plot to ``OUT/results.md`` and
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
    policy = _model_path(config, overrides)
    if arm != "sft":
        _run(_cli("train", config, *overrides, *ARMS[arm], f"trainer.seed={seed}",
                  f"checkpoint.dir={folder / 'checkpoints'}", f"logging.dir={folder / 'logs'}",
                  f"trainer.export_dir={folder / 'hf'}", "checkpoint.save_interval=0", "logging.progress=false"),
             log)
        policy = str(folder / "hf")
    _run(_cli("eval", "-c", config, *overrides, f"model.path={policy}", f"logging.dir={folder / 'eval'}",
              "eval.split=test"), log)
    summary = [r for r in read_metrics(folder / "eval" / "metrics.jsonl") if "eval/test/accuracy" in r][-1]
    summary["seconds"] = time.time() - start
    summary_file.write_text(json.dumps(summary))
    return summary


def _model_path(config: str, overrides: list[str]) -> str:
    return load_config(config, overrides).model.path


def aggregate(results: dict[tuple[str, int], dict], arms: list[str]) -> tuple[list[str], dict]:
    """(families, {arm: {family: (mean, std, n_questions)}}) of test accuracy over seeds."""
    families = sorted({k[len("eval/test/"):-len("/accuracy")] for r in results.values() for k in r
                       if k.startswith("eval/test/") and k.endswith("/accuracy") and k.count("/") == 3})
    table = {}
    for arm in arms:
        runs = [r for (a, _), r in results.items() if a == arm]
        row = {}
        for family in ["all", *families]:
            key = "eval/test/accuracy" if family == "all" else f"eval/test/{family}/accuracy"
            values = [r[key] for r in runs if key in r]
            if values:
                count = runs[0].get(key[:-len("accuracy")] + "count")
                row[family] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                               count)
        table[arm] = row
    return families, table


def markdown(families: list[str], table: dict, seeds: list[int]) -> str:
    columns = ["all", *families]
    counts = next(iter(table.values()))
    header = " | ".join(f"{c} (n={counts[c][2]})" if c in counts else c for c in columns)
    lines = [f"| arm | {header} |", "| --- |" + " --- |" * len(columns)]
    for arm, row in table.items():
        cells = [f"{row[c][0]:.3f} +- {row[c][1]:.3f}" if c in row else "-" for c in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Greedy test accuracy, mean +- std over seeds {seeds} (sample std; the sft row is one "
                 "evaluation of the common starting policy).")
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
    policy = Path(_model_path(config, overrides))
    if not (policy / "config.json").exists():
        raise FileNotFoundError(f"model.path={policy}: no SFT policy there; run `megatron-ivr sft {config}` "
                                "(or the first steps of `make demo`) first")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # the SFT arm does not depend on the seed: evaluated once
    work = [(arm, seed) for seed in seeds for arm in arms if arm != "sft" or seed == seeds[0]]
    results: dict[tuple[str, int], dict] = {}

    def one(item):
        arm, seed = item
        summary = run_arm(config, overrides, arm, seed, out)
        results[item] = summary
        progress(f"[ablate] {len(results)}/{len(work)} {arm} seed {seed}: test accuracy "
                 f"{summary['eval/test/accuracy']:.3f} ({time.time() - start:.0f}s so far)")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, work))
    families, table = aggregate(results, arms)
    text = markdown(families, table, seeds)
    plot(families, table, out / "accuracy.png")
    wall = time.time() - start
    command = "megatron-ivr ablate " + " ".join([config, *overrides])
    (out / "results.md").write_text(f"# Ablation\n\nCommand: `{command}` (arms {arms}, seeds {seeds})\n\n"
                                    f"{text}\n\nWall time: {wall / 60:.1f} min.\n\n![accuracy](accuracy.png)\n")
    return text + f"\nwall time {wall / 60:.1f} min; written to {out / 'results.md'}"
