"""The timing harness's interleaved rounds."""

from mnist_ann.evaluation.timing import time_interleaved


def test_interleaved_rounds_run_every_run_once_a_round_in_turn() -> None:
    calls: list[str] = []

    def run(name: str):
        def once() -> int:
            calls.append(name)
            return len(calls)
        return once

    results, seconds = time_interleaved({"a": run("a"), "b": run("b")}, 3)
    assert calls == ["a", "b"] * 3
    assert results == {"a": 5, "b": 6}  # each run's last result
    assert {name: len(times) for name, times in seconds.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for times in seconds.values() for t in times)
