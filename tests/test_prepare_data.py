"""prepare_data.py end to end: default files and counts, byte-identical reruns, one-line errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import coderl.hub_data as hub_data
import prepare_data
from coderl.errors import UserError
from coderl.tasks import load_tasks
from tests.helpers import REPO, run_script

FIXTURES = Path(__file__).parent / "fixtures"
SMALL_TOY = [
    "--toy_python_train",
    "40",
    "--toy_python_test",
    "20",
    "--toy_cpp_train",
    "20",
    "--toy_cpp_test",
    "10",
    "--toy_python_rl",
    "30",
    "--toy_cpp_rl",
    "0",
]


def run_prepare_data(*args: str) -> subprocess.CompletedProcess:
    return run_script("prepare_data.py", list(args), cwd=REPO, timeout=300)


def test_default_run_writes_every_file_with_its_count_and_reruns_identically(tmp_path):
    first = run_prepare_data("--output_dir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    expected = {
        "humaneval": 164,
        "humaneval_train": 131,
        "humaneval_test": 33,
        "toy_python_train": 500,
        "toy_python_test": 300,
        "toy_python_rl": 1000,
        "toy_cpp_train": 300,
        "toy_cpp_test": 100,
        "toy_cpp_rl": 300,
    }
    for name, count in expected.items():
        assert f"wrote {tmp_path / 'a' / name}.jsonl ({count} tasks)" in first.stdout
        assert len(load_tasks(tmp_path / "a" / f"{name}.jsonl")) == count
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        f"{n}.jsonl" for n in expected
    )
    test_ids = {t["task_id"] for t in load_tasks(tmp_path / "a" / "humaneval_test.jsonl")}
    train_ids = {t["task_id"] for t in load_tasks(tmp_path / "a" / "humaneval_train.jsonl")}
    assert not test_ids & train_ids

    second = run_prepare_data("--output_dir", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    for name in expected:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{name}.jsonl"
        ).read_bytes()


def test_bad_flag_is_one_line_and_exit_2(tmp_path):
    done = run_prepare_data("--output_dir", str(tmp_path), "--no_such_flag", "1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown option(s): --no_such_flag 1 (see --help)"
    ]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_help_documents_every_option():
    done = run_prepare_data("--help")
    assert done.returncode == 0
    for option in (
        "--output_dir",
        "--source",
        "--seed",
        "--toy_max_ops",
        "--languages",
        "--splits",
        "--max_rows",
    ):
        assert option in done.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--source", "humaneval,apps"],
            "--source: unknown apps (choose from humaneval, toy, mbpp,",
        ),
        (["--source", " , "], "--source is empty"),
        (["--toy_python_test", "-1"], "--toy_python_test must be in [0, inf), got -1"),
        (
            ["--source", "toy", "--toy_cpp_rl", "0", "--toy_cpp_val", "5"],
            "a validation slice is held back from the RL pool: ask for rl > 0",
        ),
        (["--toy_max_ops", "0"], "--toy_max_ops must be in [1, inf), got 0"),
        (["--toy_flawed_demos", "1.5"], "--toy_flawed_demos must be in [0, 1], got 1.5"),
        (["--humaneval_test_size", "0"], "--humaneval_test_size must be in [1, 163], got 0"),
        (
            ["--source", "code_contests", "--languages", "java"],
            "--languages: unknown java (choose from python, cpp)",
        ),
    ],
)
def test_bad_values_are_user_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main(["--output_dir", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}")
    assert err.count("\n") == 1


def test_options_are_parsed_and_toy_sizes_follow_them(tmp_path, capsys):
    prepare_data.main(
        ["--output_dir", str(tmp_path), "--source", "toy", "--toy_max_ops", "2", *SMALL_TOY]
    )
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'toy_python_train.jsonl'} (40 tasks)" in out
    assert f"wrote {tmp_path / 'toy_cpp_test.jsonl'} (10 tasks)" in out
    assert f"wrote {tmp_path / 'toy_python_rl.jsonl'} (30 tasks)" in out
    assert not (tmp_path / "toy_cpp_rl.jsonl").exists()  # 0 = no pool
    solutions = [t["canonical_solution"] for t in load_tasks(tmp_path / "toy_python_train.jsonl")]
    assert max(solution.count("\n") for solution in solutions) == 3  # 2 steps + return


def test_validation_slice_is_its_own_file_and_leaves_the_rl_pool_as_it_was(tmp_path, capsys):
    plain, held = tmp_path / "plain", tmp_path / "held"
    prepare_data.main(["--output_dir", str(plain), "--source", "toy", *SMALL_TOY])
    prepare_data.main(
        ["--output_dir", str(held), "--source", "toy", *SMALL_TOY, "--toy_python_val", "12"]
    )
    assert f"wrote {held / 'toy_python_val.jsonl'} (12 tasks)" in capsys.readouterr().out
    assert (held / "toy_python_rl.jsonl").read_bytes() == (
        plain / "toy_python_rl.jsonl"
    ).read_bytes()
    assert (
        not (plain / "toy_python_val.jsonl").exists() and not (held / "toy_cpp_val.jsonl").exists()
    )
    val = load_tasks(held / "toy_python_val.jsonl")
    assert not {t["prompt"] for t in val} & {
        t["prompt"] for t in load_tasks(held / "toy_python_rl.jsonl")
    }


def test_flawed_demonstrations_are_counted_and_marked(tmp_path, capsys):
    prepare_data.main(
        ["--output_dir", str(tmp_path), "--source", "toy", "--toy_flawed_demos", "0.5", *SMALL_TOY]
    )
    out = capsys.readouterr().out
    train = load_tasks(tmp_path / "toy_python_train.jsonl")
    flawed = sum(1 for task in train if task.get("flaw") == "drops the last step")
    assert 10 < flawed < 30
    assert f"(40 tasks, {flawed} flawed demonstrations)" in out
    for name in ("toy_python_test", "toy_python_rl", "toy_cpp_test"):
        tasks = load_tasks(tmp_path / f"{name}.jsonl")
        assert not any("flaw" in task for task in tasks)
        assert f"{name}.jsonl ({len(tasks)} tasks)\n" in out


def test_hub_sources_write_one_file_per_split_and_report_skips(tmp_path, capsys, monkeypatch):
    def fixture_loader(path, config, split, max_rows=0):
        if path == "deepmind/code_contests":
            return json.loads((FIXTURES / "code_contests_rows.json").read_text())
        if path == hub_data.DEEPCODER_PATH:
            return json.loads((FIXTURES / "deepcoder_rows.json").read_text())[config]
        name = "mbpp_sanitized_rows.json" if config == "sanitized" else "mbpp_full_rows.json"
        return json.loads((FIXTURES / name).read_text())

    monkeypatch.setattr(hub_data, "load_hub_rows", fixture_loader)
    prepare_data.main(
        [
            "--output_dir",
            str(tmp_path),
            "--source",
            "mbpp,mbpp_sanitized,code_contests,deepcoder",
            "--splits",
            "train,test",
            "--deepcoder_subsets",
            "lcbv5,taco",
            "--languages",
            "python,cpp",
        ]
    )
    out = capsys.readouterr().out
    counts = {
        "mbpp_train": 6,
        "mbpp_test": 6,
        "mbpp_sanitized_test": 2,
        "code_contests_test": 1,
        "deepcoder_lcbv5_train": 2,
        "deepcoder_lcbv5_test": 2,
        "deepcoder_taco_train": 2,
    }
    for name, count in counts.items():
        assert f"wrote {tmp_path / name}.jsonl ({count} tasks)" in out
        assert len(load_tasks(tmp_path / f"{name}.jsonl")) == count
    assert not (tmp_path / "deepcoder_taco_test.jsonl").exists()  # taco has no test split
    assert "  code_contests_test: skipped 1 row(s): no python/cpp solution" in out
    assert "  deepcoder_taco_train: skipped 1 row(s): tests are not valid JSON" in out
    assert load_tasks(tmp_path / "code_contests_test.jsonl")[0]["language"] == "python"
    assert load_tasks(tmp_path / "deepcoder_lcbv5_test.jsonl")[0]["language"] == "python"


def test_offline_hub_source_fails_in_one_line_after_local_files_are_written(
    tmp_path, capsys, monkeypatch
):
    def offline(path, config, split, max_rows=0):
        raise UserError(f"cannot load {path} ({config}) split {split!r} from the hub: no network")

    monkeypatch.setattr(hub_data, "load_hub_rows", offline)
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main(["--output_dir", str(tmp_path), "--source", "toy,mbpp", *SMALL_TOY])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "error: cannot load google-research-datasets/mbpp (full) split 'train' from the hub:"
        " no network\n"
    )
    assert len(load_tasks(tmp_path / "toy_python_train.jsonl")) == 40
