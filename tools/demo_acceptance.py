"""The demo's acceptance lines (issue 26; docs/results.md), from `make demo-check`'s ablation.

    python tools/demo_acceptance.py runs/demo-check/ablate [--family union] [--rl ivr-r1+vicra]

Reads each run's evaluation summary (``ARM/seedN/eval/summary.json``, written by
``megatron-ivr ablate`` with ``eval.blank_images=true``) and checks, per seed and over seeds:

- the family with no demonstrations: RL - SFT >= +10 points on accuracy macro-averaged over
  gold answers averaged over seeds, >= +6 in every seed; RL's raw accuracy >= the family's
  majority-answer share + 10;
- the gain needs the image: RL's accuracy on the family minus its accuracy with every image
  blanked >= 10 points in every seed;
- no regression: the other families together >= SFT - 2 points, none below SFT - 5, on raw
  accuracy (their change macro-averaged over gold answers is printed beside it: a policy that
  stops guessing a family's most common answer loses raw accuracy but not macro).

Prints one line per check with the numbers; exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(out: Path, arm: str) -> dict[int, dict]:
    runs = {}
    for path in sorted(out.glob(f"{arm}/seed*/eval/summary.json")):
        runs[int(path.parent.parent.name[len("seed"):])] = json.loads(path.read_text())
    return runs


def checks(sft: dict[int, dict], rl: dict[int, dict], family: str) -> list[tuple[bool, str]]:
    """(passed, line) per acceptance check; seeds are those with both an SFT and an RL summary."""
    seeds = sorted(set(sft) & set(rl))
    if not seeds:
        raise ValueError("no seed has both an SFT and an RL evaluation summary")
    key = f"eval/test/{family}/"
    out = []
    gains = {s: rl[s][key + "accuracy_macro"] - sft[s][key + "accuracy_macro"] for s in seeds}
    mean_gain = statistics.mean(gains.values())
    per_seed = ", ".join(f"seed {s}: {g * 100:+.1f}" for s, g in gains.items())
    out.append((mean_gain >= 0.10, f"{family}: RL - SFT, macro over gold answers, mean {mean_gain * 100:+.1f} "
                                   f"points (>= +10) [{per_seed}]"))
    out.append((min(gains.values()) >= 0.06, f"{family}: RL - SFT >= +6 in every seed [{per_seed}]"))
    for s in seeds:
        raw, majority = rl[s][key + "accuracy"], rl[s][key + "majority_share"]
        out.append((raw >= majority + 0.10, f"{family}, seed {s}: RL raw accuracy {raw:.3f} >= majority share "
                                            f"{majority:.3f} + 0.10"))
        blank = rl[s][f"eval/test_blank/{family}/accuracy"]
        out.append((raw - blank >= 0.10, f"{family}, seed {s}: RL with the image {raw:.3f} - blanked {blank:.3f} "
                                         f"= {(raw - blank) * 100:+.1f} points (>= +10)"))
    others = sorted({k.split("/")[2] for k in sft[seeds[0]]
                     if k.startswith("eval/test/") and k.endswith("/accuracy") and k.count("/") == 3} - {family})
    for s in seeds:
        deltas = {f: rl[s][f"eval/test/{f}/accuracy"] - sft[s][f"eval/test/{f}/accuracy"] for f in others}
        together = statistics.mean(deltas.values())  # the families have equal counts in the test split
        macro = {f: rl[s].get(f"eval/test/{f}/accuracy_macro", float("nan"))
                 - sft[s].get(f"eval/test/{f}/accuracy_macro", float("nan")) for f in others}
        listed = ", ".join(f"{f} {d * 100:+.1f}" for f, d in deltas.items())
        listed += "; macro over gold answers: " + ", ".join(f"{f} {d * 100:+.1f}" for f, d in macro.items())
        out.append((together >= -0.02, f"seed {s}: the other families together {together * 100:+.1f} points "
                                       f"(>= -2) [{listed}]"))
        out.append((min(deltas.values()) >= -0.05, f"seed {s}: no family below SFT - 5 [{listed}]"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ablation", type=Path, help="the ablation folder (make demo-check: runs/demo-check/ablate)")
    parser.add_argument("--family", default="union", help="the family with no demonstrations")
    parser.add_argument("--rl", default="ivr-r1+vicra", help="the RL arm")
    args = parser.parse_args(argv)
    results = checks(load(args.ablation, "sft"), load(args.ablation, args.rl), args.family)
    for passed, line in results:
        print(("PASS " if passed else "FAIL ") + line)
    failed = sum(not passed for passed, _ in results)
    print(f"demo acceptance: {len(results) - failed}/{len(results)} checks pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
