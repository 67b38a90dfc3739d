"""The benchmarks' alternated timing: per-round medians and the median of per-round ratios."""

import time

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
    assert 1.8 < timed.ratio("fast", "slow") < 3.5
