"""bench/bench_rl_step.py end to end at its smallest: both sides train in the asked dtype, and
every step's time comes with the peak RSS during it."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import load_bench_module


def test_each_step_has_its_peak_rss_beside_its_time(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("trl")
    bench = load_bench_module("bench_rl_step")
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--model",
            tiny_model_dir,
            "--dtype",
            "bfloat16",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--num_prompts",
            "2",
            "--num_generations",
            "2",
            "--max_new_tokens",
            "8",
            "--sandbox_workers",
            "1",
            "--output",
            str(out),
        ]
    )
    summary = json.loads(out.read_text())
    assert summary["settings"]["dtype"] == "bfloat16"
    for side in ("ours", "trl"):
        steps = summary[side]["per_step"]
        assert len(steps) == 2  # the warm-up step and the measured one
        for step in steps:
            assert step["step"] > 0
            assert step["peak_rss_mib"] >= step["start_rss_mib"] > 0
        assert summary[side]["peak_rss_mib"] == max(s["peak_rss_mib"] for s in steps)
        assert summary[side]["peak_rss_above_start_mib"] >= 0
    assert summary["rss"]["process_peak_mib"] >= summary["ours"]["peak_rss_mib"]
    captured = capsys.readouterr()
    assert "peak RSS MiB" in captured.out
    step_lines = [line for line in captured.err.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 2 and all(line.count("peak RSS") == 2 for line in step_lines)


def test_policy_model_is_loaded_in_the_asked_dtype(tiny_model_dir):
    bench = load_bench_module("bench_rl_step")
    for dtype, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model, _ = bench.load_policy_model(tiny_model_dir, 0, dtype)
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {expected}
