"""The timing helper's call pattern (not speed): runs of back-to-back calls, alternating order."""
from echo_export.timing import alternating_run_medians


def test_runs_alternate_and_every_fn_gets_its_repeats():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("a", "b")}
    ticks = iter(range(10_000))
    out = alternating_run_medians(fns, repeats=7, warmup=1, run_length=3, timer=lambda fn: (fn(), next(ticks))[1])
    assert set(out) == {"a", "b"}
    # round 0: a (1 warm-up + 3 timed), b (1 + 3); round 1 flips the order: b, a; round 2: a (1 + 1), b (1 + 1)
    expect = ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4 + ["a"] * 2 + ["b"] * 2
    assert calls == expect
    assert calls.count("a") - 3 == 7  # 7 timed calls each, after 3 warm-up calls


def test_run_length_one_is_round_robin():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("a", "b")}
    alternating_run_medians(fns, repeats=2, warmup=0, run_length=1)
    assert calls == ["a", "b", "b", "a"]
