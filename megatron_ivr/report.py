"""``megatron-ivr report RUN_DIR``: a run's curves as PNG and a short markdown summary.

Reads ``metrics.jsonl`` (in RUN_DIR or RUN_DIR/logs). A resumed run may have logged a step
twice (before the crash and again after the resume): the last record of a step wins.
Evaluation records (keys ``eval/...``, no step) are listed in the summary table. Curves of 20
steps or more are drawn thin per step with their trailing mean over a tenth of the run (at
least 5 steps) on top: a few prompts per step make per-step RL metrics noisy.
"""

from __future__ import annotations

import math
from pathlib import Path

from megatron_ivr.metrics import read_metrics

# (title, [(metric key, label)]) per panel; panels without data are left out; a key ending in
# "/*" stands for every key under it (labelled by the rest of the key)
PANELS = (
    ("reward", [("reward/mean", "reward"), ("reward/accuracy", "accuracy"), ("reward/format", "format")]),
    ("accuracy per question family", [("reward/accuracy/*", "")]),
    ("loss", [("loss/total", "RL loss"), ("sft/loss", "SFT loss")]),
    ("response length", [("response/length_mean", "mean"), ("response/length_max", "max")]),
    ("entropy", [("policy/entropy", "all tokens"), ("vicra/vg_entropy", "visually grounded"),
                 ("vicra/other_entropy", "other")]),
    ("VICRA", [("vicra/vg_share", "grounded share"), ("vicra/w_mean", "mean w")]),
    ("IVR-R1", [("ivr/eroded_share", "eroded share"), ("ivr/accepted_share", "accepted share")]),
    ("rollout / trainer mismatch", [("mismatch/abs_logp_diff_mean", "mean |dlogp|"),
                                    ("mismatch/abs_logp_diff_max", "max |dlogp|")]),
    ("optimizer", [("optim/grad_norm", "grad norm"), ("sft/grad_norm", "SFT grad norm")]),
    ("seconds per phase", [("time/rollout", "rollout"), ("time/ivr", "IVR"), ("time/logprob_passes", "log-probs"),
                           ("time/train", "train"), ("time/weight_sync", "sync"), ("time/step", "step")]),
)


def find_runs(run_dir: str | Path) -> dict[str, Path]:
    """Training metrics files under ``run_dir``: its own (``metrics.jsonl`` or ``logs/``) or,
    for a pipeline folder like ``runs/demo``, those of its ``sft/`` and ``rl/`` stages."""
    run_dir = Path(run_dir)
    found = {}
    for name, candidate in (("run", run_dir / "metrics.jsonl"), ("run", run_dir / "logs" / "metrics.jsonl"),
                            ("sft", run_dir / "sft" / "logs" / "metrics.jsonl"),
                            ("rl", run_dir / "rl" / "logs" / "metrics.jsonl")):
        if candidate.exists() and name not in found:
            found[name] = candidate
    return found


def find_evaluations(run_dir: str | Path) -> dict[str, dict]:
    """The last evaluation summary of each ``eval/NAME/metrics.jsonl`` under ``run_dir``, in
    the order they were written (the demo: sft, then rl)."""
    out = {}
    for path in sorted(Path(run_dir).glob("eval/*/metrics.jsonl"), key=lambda p: p.stat().st_mtime):
        records = [r for r in read_metrics(path) if any(k.startswith("eval/") for k in r)]
        if records:
            out[path.parent.name] = records[-1]
    return out


def load_steps(path: Path) -> tuple[dict[int, dict], list[dict]]:
    """Per-step records (last one wins) and the records without a step (evaluations)."""
    steps, other = {}, []
    for record in read_metrics(path):
        if "step" in record:
            steps[int(record["step"])] = record
        else:
            other.append(record)
    return dict(sorted(steps.items())), other


def _panels(count: int, cols: int, width: float, height: float):
    """A figure with room for ``count`` panels, ``cols`` to a row; returns (pyplot, figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return plt, fig, axes


def _style(ax, title: str, legend_size: int) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(plt, fig, axes, used: int, path: Path) -> Path:
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _series(steps: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    """The steps that logged ``key`` as a number, and its values there."""
    xs = [s for s, r in steps.items() if isinstance(r.get(key), (int, float))]
    return xs, [steps[s][key] for s in xs]


def _window(points: int) -> int:
    """The trailing-mean window of a curve: a tenth of its points, at least 5."""
    return max(5, points // 10)


def plot(steps: dict[int, dict], out: Path, name: str = "curves") -> Path:
    panels = [(title, [(k, label) for k, label in expand(series, steps) if any(k in r for r in steps.values())])
              for title, series in PANELS]
    panels = [(title, series) for title, series in panels if series]
    plt, fig, axes = _panels(len(panels), 3, 5, 3.2)
    for ax, (title, series) in zip(axes.flat, panels):
        window = 0
        for key, label in series:
            xs, ys = _series(steps, key)
            if len(xs) < 20:
                ax.plot(xs, ys, label=label, marker=".")
                continue
            window = _window(len(xs))
            line, = ax.plot(xs, ys, alpha=0.3, linewidth=0.8)
            ax.plot(xs, trailing_mean(ys, window), color=line.get_color(), label=label)
        _style(ax, f"{title} (bold: {window}-step mean)" if window else title, 8)
    return _save(plt, fig, axes, len(panels), out / f"{name}.png")


def expand(series: list[tuple[str, str]], steps: dict[int, dict]) -> list[tuple[str, str]]:
    """The panel's series with each ``prefix/*`` key replaced by the keys under it."""
    out = []
    for key, label in series:
        if not key.endswith("/*"):
            out.append((key, label))
            continue
        found = sorted({k for r in steps.values() for k in r if k.startswith(key[:-1])})
        out += [(k, k[len(key) - 1:]) for k in found]
    return out


def trailing_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the up to ``window - 1`` values before it."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")


def run_table(name: str, steps: dict[int, dict], metrics_path: Path, image: str) -> list[str]:
    lines = [f"## {name}: `{metrics_path}` ({len(steps)} steps)", ""]
    if steps:
        ordered = list(steps.values())
        window = max(1, len(ordered) // 5)
        first, last = ordered[:window], ordered[-window:]
        lines += [f"| metric | first {window} steps | last {window} steps |", "| --- | --- | --- |"]
        for key in ("reward/mean", "reward/accuracy", "reward/format", "sft/loss", "loss/total",
                    "response/length_mean", "policy/entropy", "vicra/vg_share", "ivr/eroded_share",
                    "ivr/accepted_share", "mismatch/abs_logp_diff_max", "time/step"):
            a = [r[key] for r in first if key in r]
            b = [r[key] for r in last if key in r]
            if a and b:
                lines.append(f"| {key} | {_mean(a):.4g} | {_mean(b):.4g} |")
        total = sum(r.get("time/step", 0.0) for r in ordered)
        lines += ["", f"Training time (sum of step times): {total:.0f} s.", ""]
    lines += [f"![{name}]({image})", ""]
    return lines


def evaluation_table(evaluations: dict[str, dict], metric: str = "accuracy") -> list[str]:
    """``metric`` (greedy accuracy, or ``accuracy_macro``: macro-averaged over gold answers) per
    suite and question family (rows) for each evaluated policy (columns)."""
    if not evaluations:
        return []
    keys = sorted({k for record in evaluations.values() for k in record
                   if k.startswith("eval/") and k.endswith(f"/{metric}")})
    if not keys:
        return []
    names = list(evaluations)
    title = {"accuracy": "accuracy", "accuracy_macro": "accuracy macro-averaged over gold answers"}.get(metric, metric)
    lines = [f"## Greedy evaluation ({title})", "", "| subset | " + " | ".join(names) + " |",
             "| --- |" + " --- |" * len(names)]
    for key in keys:
        subset = key[len("eval/"):-len(f"/{metric}")]
        count = next((r.get(key[:-len(metric)] + "count") for r in evaluations.values()), None)
        label = subset + (f" (n={int(count)})" if count else "")
        cells = [f"{evaluations[n][key]:.3f}" if key in evaluations[n] else "-" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _training_metrics(run_dir: Path) -> Path:
    runs = find_runs(run_dir)
    if not runs:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl here, in logs/, sft/logs/ or rl/logs/")
    return runs.get("rl", next(iter(runs.values())))


def compare_runs(runs: dict[str, str | Path], metrics: list[str], out: str | Path) -> Path:
    """Several runs' curves of the same metrics, one panel per metric, one line per run (its
    trailing mean over a tenth of the run, at least 5 steps), to ``out/compare.png``; and
    ``out/compare.md``: per run and metric the mean over the first and the last quarter of its
    steps. A pipeline folder contributes its RL stage."""
    if not runs or not metrics:
        raise ValueError("compare needs at least one run and one metric")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = {label: load_steps(_training_metrics(Path(path)))[0] for label, path in runs.items()}
    plt, fig, axes = _panels(len(metrics), min(3, len(metrics)), 5.5, 3.6)
    lines = ["# Runs compared", "", "Mean of each metric over the first and the last quarter of a run's steps.", "",
             "| run | " + " | ".join(f"{m} (first -> last quarter)" for m in metrics) + " |",
             "| --- |" + " --- |" * len(metrics)]
    cells: dict[str, list[str]] = {label: [] for label in loaded}
    for ax, metric in zip(axes.flat, metrics):
        for label, steps in loaded.items():
            xs, ys = _series(steps, metric)
            if not xs:
                cells[label].append("-")
                continue
            ax.plot(xs, trailing_mean(ys, _window(len(xs))), label=label)
            quarter = max(1, len(ys) // 4)
            cells[label].append(f"{_mean(ys[:quarter]):.3f} -> {_mean(ys[-quarter:]):.3f}")
        _style(ax, f"{metric} (trailing mean)", 7)
    _save(plt, fig, axes, len(metrics), out / "compare.png")
    lines += [f"| {label} | " + " | ".join(row) + " |" for label, row in cells.items()]
    lines += ["", "![compare](compare.png)", ""]
    (out / "compare.md").write_text("\n".join(lines))
    return out / "compare.md"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    runs = find_runs(run_dir)
    evaluations = find_evaluations(run_dir)
    if not runs and not evaluations:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl here, in logs/, sft/logs/, rl/logs/ or eval/*/")
    out = Path(out) if out else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Run report: {run_dir}", ""]
    table = evaluation_table(evaluations) + evaluation_table(evaluations, "accuracy_macro")
    lines += table
    for name, path in runs.items():
        steps, _ = load_steps(path)
        image = plot(steps, out, f"curves_{name}")
        lines += run_table(name, steps, path, image.name)
    (out / "report.md").write_text("\n".join(lines))
    if table:
        print("\n".join(table))
    return out / "report.md"
