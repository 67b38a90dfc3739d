"""The benchmarks' alternated timing: per-round medians and the median of per-round ratios."""

import os
import time

import pytest

from benchmarks.timing import Interleaved, interleaved_ms


def test_the_ratio_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    timed = Interleaved({"ours": [10.0, 20.0, 30.0], "theirs": [20.0, 30.0, 90.0]})
    assert timed.median("ours") == 20.0 and timed.median("theirs") == 30.0  # medians: 1.5x
    assert timed.ratio("ours", "theirs") == 2.0  # rounds: 2.0, 1.5, 3.0
    drifting = Interleaved({"ours": [10.0, 30.0, 30.0], "theirs": [15.0, 45.0, 45.0]})  # the machine slowed 3x
    assert drifting.ratio("ours", "theirs") == 1.5


def test_interleaved_calls_are_timed_in_turn_each_round():
    order = []

    def sleeper(name, seconds):
        def call():
            order.append(name)
            time.sleep(seconds)
        return call
    timed = interleaved_ms({"fast": sleeper("fast", 0.002), "slow": sleeper("slow", 0.006)}, rounds=3, block=2,
                           pause_s=0.0)
    assert order == (["fast"] * 3 + ["slow"] * 3) * 3  # one untimed call and two timed, per path per round
    assert all(len(samples) == 3 for samples in timed.samples.values())
    # A sleep never ends early, so each sample (ms) is at least its sleep; a loaded machine only
    # lengthens them (a ratio bound failed under a concurrent CI run: 2.1 against 7.8 ms).
    assert all(ms >= 2.0 for ms in timed.samples["fast"]) and all(ms >= 6.0 for ms in timed.samples["slow"])
    assert timed.median("slow") > timed.median("fast")


def test_a_probe_takes_the_fastest_call_so_one_stall_does_not_decide_it():
    from qcompile.profile import fastest_ms, median_ms

    delays = iter([0.0, 0.03, 0.001, 0.03, 0.001, 0.03])  # the warm-up call, then stalls in 3 of 5 calls

    def call():
        time.sleep(next(delays))
    assert fastest_ms(call) < 10  # the stalls are 30 ms
    delays = iter([0.0, 0.03, 0.001, 0.03, 0.001, 0.03])
    assert median_ms(call, repeats=5, warmup=1) >= 30  # what the median of the same calls would say


def sleeping_row():
    """A row built in the isolated process: its note says which process built it."""
    from benchmarks.cpu_int8 import Row

    return Row("sleeper", 1.0, note=str(os.getpid()), run=lambda: time.sleep(0.002))


def failing_row():
    raise ValueError("no such runtime")


def test_an_isolated_path_is_built_and_timed_in_a_process_of_its_own():
    from benchmarks.isolated import IsolatedPath

    path = IsolatedPath(sleeping_row)
    try:
        assert path.row.name == "sleeper" and path.row.run is None  # the calls stay in their process
        assert int(path.row.note) != os.getpid()
        assert path.sample(3) >= 2.0  # the median of 3 sleeps of 2 ms, timed over there
        assert path.sample(3, one=True) is None  # the row has no single-request call
    finally:
        path.close()
    assert not path._process.is_alive()


def test_an_isolated_path_whose_build_fails_says_its_process_died():
    from benchmarks.isolated import IsolatedPath

    with pytest.raises(RuntimeError, match="process died"):
        IsolatedPath(failing_row)
