"""A fixed set of the graph fuzzer's seeded random models (``make fuzz N=1000`` runs more)."""

import warnings

import pytest

from tests.fuzz import TARGETS, check_case, make_case

SEEDS = range(1000, 1013)  # 1012: a linear + residual + relu feeding an int8 linear


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_model_compiles_cleanly_and_keeps_every_promise(seed, tmp_path):
    case = make_case(seed)
    for target in TARGETS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = check_case(case, target, tmp_path)
        assert outcome == "ok" or outcome.startswith("refused"), outcome


def test_the_fixed_set_covers_both_families_and_the_ops_it_promises():
    programs = [make_case(seed).model.program for seed in SEEDS]
    ops = {step[0] for program in programs for step in program}
    families = {type(make_case(seed).model).__name__ for seed in SEEDS}
    assert families == {"SequenceModel", "ImageModel"}
    assert len(ops) >= 12, sorted(ops)
