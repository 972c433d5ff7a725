"""The training loop's progress lines (megatron_ivr/training/loop.py)."""

from __future__ import annotations

from megatron_ivr.training.loop import Progress


def test_plain_progress_prints_first_last_and_one_step_per_interval(capsys):
    """Not on a terminal (pytest captures stdout): the first and the last step, and one step
    every ``plain_interval_s`` seconds of the clock in between."""
    now = [0.0]
    progress = Progress("sft", 10, (("sft/loss", "loss"),), plain_interval_s=10.0, clock=lambda: now[0])
    assert not progress.tty
    for step in range(1, 11):
        now[0] = 3.0 * step  # 3 s per step
        progress.update(step, {"sft/loss": 1.0 / step}, 3.0)
    lines = capsys.readouterr().out.splitlines()
    # printed at t=3 (step 1), then at t=15 (step 5, 12 s later), t=27 (step 9), and the last step
    assert [line.split()[2] for line in lines] == ["1/10", "5/10", "9/10", "10/10"]
    assert lines[0] == "[sft] step 1/10 loss 1 3.0 s/step"


def test_disabled_progress_prints_nothing_but_messages(capsys):
    progress = Progress("rl", 3, (("reward/mean", "reward"),), enabled=False)
    progress.update(1, {"reward/mean": 0.5}, 1.0)
    progress.message("[rl] resumed")
    assert capsys.readouterr().out == "[rl] resumed\n"
