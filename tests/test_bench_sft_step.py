"""bench/bench_sft_step.py end to end at its smallest: both sides train, agree on the loss, and the
figures it writes are consistent."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_bench_module


def test_one_step_each_side_same_loss_and_consistent_figures(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    bench = load_bench_module("bench_sft_step")
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--model",
            tiny_model_dir,
            "--warmup",
            "1",
            "--steps",
            "1",
            "--batch_size",
            "2",
            "--num_tasks",
            "16",
            "--threads",
            "1",
            "--output",
            str(out),
        ]
    )
    summary = json.loads(out.read_text())
    loss = summary["first_step_loss"]
    assert loss["ours"] > 0 and loss["trl"] > 0
    assert abs(loss["ours"] - loss["trl"]) <= 1e-4 * max(loss["ours"], loss["trl"])
    assert loss["agree"]
    for side in ("ours", "trl"):
        assert len(summary[side]["per_step"]) == 2  # the warm-up step and the measured one
        assert summary[side]["step"] > 0
        assert summary[side]["seconds_per_example"] == pytest.approx(summary[side]["step"] / 2)
        assert summary[side]["peak_rss_mib"] > 0
    assert summary["ratio_ours_over_trl"] == pytest.approx(
        summary["ours"]["step"] / summary["trl"]["step"]
    )


def test_losses_that_differ_fail_the_run(tiny_model_dir, tmp_path, monkeypatch):
    """The agreement check can fail: ours made to report twice its loss ends the run with 1."""
    pytest.importorskip("trl")
    bench = load_bench_module("bench_sft_step")
    original = bench.Ours.step

    def doubled(self, micro_batches):
        metrics = original(self, micro_batches)
        self.clock.loss *= 2
        return metrics

    monkeypatch.setattr(bench.Ours, "step", doubled)
    argv = ["--model", tiny_model_dir, "--warmup", "0", "--steps", "1", "--batch_size", "2"]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(
            [*argv, "--num_tasks", "16", "--threads", "1", "--output", str(tmp_path / "b.json")]
        )
    assert exit_info.value.code == 1
    assert not json.loads((tmp_path / "b.json").read_text())["first_step_loss"]["agree"]
