"""Format reward for both templates and the combined reward ``lam * fmt + (1 - lam) * acc``."""

from __future__ import annotations

import time

import pytest

from megatron_ivr.config.schema import RewardConfig
from megatron_ivr.rewards import RewardFunction, combine, format_reward
from megatron_ivr.rewards.pool import TimeLimitedPool

IVR_OK = "<desc>Two red circles.</desc>\n<think>2 red objects.</think>\n\\boxed{2}"
R1_OK = "<think>2 red objects.</think> The answer is \\boxed{2}"


@pytest.mark.parametrize("response, template, expected", [
    (IVR_OK, "ivr", 1.0),
    (R1_OK, "r1", 1.0),
    (IVR_OK, "r1", 0.0),                                        # <desc> is not part of r1
    (R1_OK, "ivr", 0.0),                                        # <desc> missing
    ("<think>a</think><desc>b</desc>\\boxed{2}", "ivr", 0.0),   # wrong order
    ("<desc> </desc><think>a</think>\\boxed{2}", "ivr", 0.0),   # empty description
    ("<desc>a</desc><think>b</think>", "ivr", 0.0),             # no final box
    ("<desc>a</desc><think>b \\boxed{2}</think>", "ivr", 0.0),  # box inside think only
    ("<desc>a</desc><think>b</think><think>c</think>\\boxed{2}", "ivr", 0.0),  # tag twice
    ("  <think>x</think>\n\\boxed{\\frac{1}{2}}\n", "r1", 1.0),  # whitespace, nested braces
    ("<think>x</think>\\boxed{}", "r1", 0.0),                    # empty answer
])
def test_format_reward(response, template, expected):
    assert format_reward(response, template) == expected


def test_unknown_template():
    with pytest.raises(ValueError):
        format_reward("x", "xml")


def test_combined_reward_follows_spec_section_1():
    assert combine(1.0, 0.0, 0.1) == pytest.approx(0.1)
    assert combine(0.0, 1.0, 0.1) == pytest.approx(0.9)
    with RewardFunction(RewardConfig(lam=0.25, template="ivr")) as reward_fn:
        results = reward_fn([IVR_OK, IVR_OK.replace("{2}", "{3}"), "\\boxed{2}", "nothing"], ["2", "2", "2", "2"])
    assert [(r.format, r.accuracy) for r in results] == [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0)]
    assert [r.total for r in results] == pytest.approx([1.0, 0.25, 0.75, 0.0])


def test_adversarial_20kb_latex_is_graded_zero_within_the_limit():
    nest = 2000
    answer = "\\boxed{" + "\\frac{1}{" * nest + "x" + "}" * nest + "}"
    assert len(answer) >= 20_000
    limit = 2.0
    with RewardFunction(RewardConfig(grader_timeout_s=limit)) as reward_fn:
        reward_fn(["\\boxed{1}"], ["1"])  # warm the worker (imports) outside the timed call
        start = time.monotonic()
        result = reward_fn([answer, IVR_OK], ["3", "2"])
        elapsed = time.monotonic() - start
    assert result[0].accuracy == 0.0 and result[1].accuracy == 1.0  # the next answer is unharmed
    assert elapsed < limit + 1.0 + 1.5  # inner limit, outer limit (+1 s), and a margin for a respawn


def test_pool_kills_a_hung_call_and_keeps_order():
    with TimeLimitedPool(time.sleep, num_workers=2, timeout_s=0.5, default="timeout") as pool:
        start = time.monotonic()
        results = pool.map([(0.0,), (30.0,), (0.0,), (0.1,)])
        elapsed = time.monotonic() - start
        # time.sleep returns None, which also maps to the default: every slot holds it, and
        # only the 30 s call was cut off
        assert results == ["timeout"] * 4
        assert pool.timeouts == 1
        assert elapsed < 5.0
        assert pool.map([(0.0,)]) == ["timeout"]  # the replaced worker serves again


def test_pool_returns_values_in_order():
    with TimeLimitedPool(abs, num_workers=2, timeout_s=5.0, default=None) as pool:
        assert pool.map([(-3,), (4,), (-5,), (0,)]) == [3, 4, 5, 0]


def _slow_start() -> None:
    time.sleep(1.5)


def test_pool_does_not_count_a_slow_worker_start_against_calls():
    # a worker's start (here a 1.5 s warm-up, like importing sympy on a loaded machine) is
    # longer than the 0.5 s call limit: the calls must still be served, none cut off
    with TimeLimitedPool(abs, num_workers=2, timeout_s=0.5, default=None, warmup=_slow_start) as pool:
        assert pool.map([(-1,), (2,), (-3,)]) == [1, 2, 3]
        assert pool.timeouts == 0


def test_a_replaced_worker_takes_calls_only_once_it_has_started():
    # one worker: the hung call's replacement must announce itself before it gets the next calls
    with TimeLimitedPool(time.sleep, num_workers=1, timeout_s=0.5, default="timeout",
                         warmup=_slow_start) as pool:
        assert pool.map([(30.0,), (0.0,), (0.0,)]) == ["timeout"] * 3
        assert pool.timeouts == 1


def _broken_start() -> None:
    raise SystemExit(3)


def test_pool_reports_a_worker_that_cannot_start():
    with TimeLimitedPool(abs, num_workers=1, timeout_s=0.5, default=None, warmup=_broken_start) as pool:
        with pytest.raises(RuntimeError, match="died while starting"):
            pool.map([(-1,)])


def test_answer_extraction_is_linear_on_a_1mb_adversarial_response():
    from megatron_ivr.rewards.extract import last_boxed

    unclosed = "\\boxed{" * (1_000_000 // 7)  # every box unclosed: the quadratic scan's worst case
    start = time.process_time()  # CPU time: other processes on a busy machine do not count
    assert last_boxed(unclosed) is None
    assert last_boxed(unclosed + "}") == ""  # the last box closes
    assert format_reward("<desc>a</desc><think>b</think>" + unclosed, "ivr") == 0.0
    assert time.process_time() - start < 1.0


def test_the_whole_reward_runs_under_the_time_limit(monkeypatch):
    """Format and extraction run in the pool too: a response whose format check alone would
    overrun the limit scores 0 on both, in about the limit, and the next one is unharmed."""
    limit = 1.0
    with RewardFunction(RewardConfig(grader_timeout_s=limit, lam=0.5)) as reward_fn:
        reward_fn(["\\boxed{1}"], ["1"])  # warm the worker (imports) outside the timed call
        start = time.monotonic()
        slow = "<desc>a</desc><think>b</think>\\boxed{" + "{" * 5_000_000 + "}" * 5_000_000 + "}"
        results = reward_fn([slow * 40, IVR_OK], ["2", "2"])
        elapsed = time.monotonic() - start
    assert (results[0].format, results[0].accuracy) == (0.0, 0.0) and results[1].total == 1.0
    assert elapsed < limit + 1.0 + 3.0  # inner limit, outer limit (+1 s), margin for pickling and a respawn


def test_pool_replaces_a_worker_that_died_while_idle():
    with TimeLimitedPool(abs, num_workers=2, timeout_s=5.0, default=None) as pool:
        assert pool.map([(-1,), (-2,)]) == [1, 2]
        for process, _ in pool._workers:
            process.kill()
            process.join()
        assert pool.map([(-3,), (4,), (-5,)]) == [3, 4, 5]  # was BrokenPipeError on every later call
        assert pool.map([(-6,)]) == [6]


@pytest.mark.parametrize("answer", ["３", "٣", "3\x00", "\x003"])
def test_unicode_digits_and_control_characters_are_refused(answer):
    from megatron_ivr.rewards.accuracy import accuracy_reward

    assert accuracy_reward(f"\\boxed{{{answer}}}", "3") == 0.0
    assert accuracy_reward("\\boxed{3}", "3") == 1.0
