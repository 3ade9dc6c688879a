"""eval_humaneval.py end to end: scoring only, generation, resume, compare, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO, humaneval_file, humaneval_tasks, run_script

HUMANEVAL = humaneval_file()


def run_eval(*args, check=True):
    proc = run_script("eval_humaneval.py", [str(a) for a in args], cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"eval failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_canonical_solutions_as_samples_score_164_of_164(tmp_path):
    samples = tmp_path / "samples.jsonl"
    write_jsonl(
        samples,
        [
            {"task_id": t["task_id"], "completion": t["canonical_solution"]}
            for t in humaneval_tasks()
        ],
    )
    run_eval("--problems", HUMANEVAL, "--samples", samples, "--output_dir", tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_tasks"] == 164
    assert summary["passed_tasks"] == 164
    assert summary["pass@k"]["pass@1"] == 1.0
    assert summary["status_counts"] == {"passed": 164}
    results = read_rows(tmp_path / "out" / "results.jsonl")
    assert len(results) == 164 and all(r["passed"] for r in results)
    assert "| 1.000 | 164 / 164 |" in (tmp_path / "out" / "table.md").read_text()


def test_wrong_samples_fail_and_pass_at_k_uses_every_sample(tmp_path):
    tasks = humaneval_tasks()[:3]
    samples = []
    for t in tasks:
        samples.append({"task_id": t["task_id"], "completion": t["canonical_solution"]})
        samples.append({"task_id": t["task_id"], "completion": "    return None\n"})
    write_jsonl(tmp_path / "s.jsonl", samples)
    problems = tmp_path / "p.jsonl"
    write_jsonl(problems, tasks)
    run_eval(
        "--problems",
        problems,
        "--samples",
        tmp_path / "s.jsonl",
        "--output_dir",
        tmp_path / "o",
        "--ks",
        "1,2",
    )
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["pass@k"] == {"pass@1": 0.5, "pass@2": 1.0}
    assert [r["completion_id"] for r in read_rows(tmp_path / "o" / "results.jsonl")] == [0, 1] * 3


def test_table_k_makes_a_pass_at_k_table_and_refuses_to_mix_it_with_pass_at_1(tmp_path):
    tasks = humaneval_tasks()[:3]
    samples = []
    for t, solved in zip(tasks, (2, 1, 0), strict=True):
        wrong = {"task_id": t["task_id"], "completion": "    return None\n"}
        right = {"task_id": t["task_id"], "completion": t["canonical_solution"]}
        samples += [wrong, right] if solved == 1 else [right, right] if solved else [wrong, wrong]
    write_jsonl(tmp_path / "s.jsonl", samples)
    write_jsonl(tmp_path / "p.jsonl", tasks)
    table = tmp_path / "pass2.md"
    common = ["--problems", tmp_path / "p.jsonl", "--samples", tmp_path / "s.jsonl", "--ks", "1,2"]
    run_eval(*common, "--output_dir", tmp_path / "o", "--table", table, "--table_k", "2")
    assert table.read_text().splitlines() == [
        "| Model / Checkpoint | Method | pass@2 | #solved / #tasks | Avg. length |",
        "|---|---|:---:|:---:|:---:|",
        "| `s.jsonl` | Samples | 0.667 | 2 / 3 | - |",
    ]
    proc = run_eval(*common, "--output_dir", tmp_path / "o1", "--table", table, check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"error: {table} is not a table of pass@1 rows; use another --table"
    )
    proc = run_eval(*common, "--output_dir", tmp_path / "o3", "--table_k", "3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --table_k 3: every task needs at least 3 samples"
    )
    proc = run_eval(
        "--problems", tmp_path / "p.jsonl", "--model", "m", "--output_dir", tmp_path / "g",
        "--table_k", "8", check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --table_k 8 needs --n_samples >= 8"


def test_malformed_sample_line_and_unknown_task_are_one_line_errors(tmp_path):
    problems = tmp_path / "p.jsonl"
    write_jsonl(problems, humaneval_tasks()[:2])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": "    pass\\n"}\n{not json\n')
    proc = run_eval(
        "--problems", problems, "--samples", bad, "--output_dir", tmp_path / "o", check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "bad.jsonl:2" in proc.stderr
    unknown = tmp_path / "unknown.jsonl"
    write_jsonl(
        unknown,
        [
            {"task_id": "HumanEval/0", "completion": "    pass\n"},
            {"task_id": "Nope/1", "completion": "    pass\n"},
        ],
    )
    proc = run_eval(
        "--problems", problems, "--samples", unknown, "--output_dir", tmp_path / "o", check=False
    )
    assert proc.returncode == 2
    assert "unknown.jsonl:2" in proc.stderr and "Nope/1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_options_are_clear_errors(tmp_path):
    proc = run_eval(
        "--problems", tmp_path / "missing.jsonl", "--samples", "x", "--output_dir", "o", check=False
    )
    assert (
        proc.returncode == 2 and "missing.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    )
    proc = run_eval("--problems", "p.jsonl", check=False)
    assert proc.returncode == 2 and "--output_dir" in proc.stderr


def test_help_lists_options():
    out = run_eval("--help").stdout
    for flag in ("--problems", "--samples", "--model", "--compare", "--n_samples", "--limit"):
        assert flag in out


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    from coderl.toy_tasks import generate_toy_python

    _, test = generate_toy_python(n_train=10, n_test=6, seed=0)
    path = tmp_path_factory.mktemp("toy") / "toy_test.jsonl"
    write_jsonl(path, test)
    return path


def test_generation_mode_then_scoring_mode_agree(tmp_path, tiny_model_dir, toy_file):
    out = tmp_path / "gen"
    run_eval(
        "--model",
        tiny_model_dir,
        "--problems",
        toy_file,
        "--output_dir",
        out,
        "--max_new_tokens",
        "24",
        "--batch_size",
        "4",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_tasks"] == 6 and summary["num_samples"] == 6
    settings = summary["settings"]
    assert settings["max_new_tokens"] == 24 and settings["temperature"] == 0.0
    assert settings["timeout"] == 3.0 and settings["prompt_mode"] == "base"
    assert (
        settings["model_info"]["quantization"] == "none" and "\ndef " in settings["stop_sequences"]
    )
    gen_results = read_rows(out / "results.jsonl")
    samples = read_rows(out / "samples.jsonl")
    assert [s["task_id"] for s in samples] == [r["task_id"] for r in gen_results]
    assert summary["avg_num_tokens"] == pytest.approx(
        sum(s["num_tokens"] for s in samples) / len(samples)
    )
    # The same completions scored on their own give the same verdicts.
    run_eval(
        "--problems",
        toy_file,
        "--samples",
        out / "samples.jsonl",
        "--output_dir",
        tmp_path / "score",
    )
    score_results = read_rows(tmp_path / "score" / "results.jsonl")
    assert [(r["task_id"], r["status"]) for r in score_results] == [
        (r["task_id"], r["status"]) for r in gen_results
    ]


def test_killed_run_resumes_and_other_settings_are_refused(tmp_path, tiny_model_dir, toy_file):
    out = tmp_path / "gen"
    common = [
        "--model",
        tiny_model_dir,
        "--problems",
        toy_file,
        "--output_dir",
        out,
        "--max_new_tokens",
        "16",
        "--batch_size",
        "2",
    ]
    run_eval(*common, "--limit", "4")
    full = read_rows(out / "samples.jsonl")
    # What a kill leaves: results for 1.5 chunks, samples one line further.
    write_jsonl(out / "results.jsonl", read_rows(out / "results.jsonl")[:3])
    write_jsonl(out / "samples.jsonl", full[:4])
    marker = "    return 12345  # kept from the first run\n"
    kept = read_rows(out / "samples.jsonl")
    kept[0]["completion"] = marker  # a finished task must not be generated again
    write_jsonl(out / "samples.jsonl", kept)
    proc = run_eval(*common)  # no --limit: extends to all 6 tasks
    assert "resuming" in proc.stderr and "3 tasks already scored" in proc.stderr
    samples = read_rows(out / "samples.jsonl")
    assert len(samples) == 6
    assert samples[0]["completion"] == marker
    assert [s["completion"] for s in samples[1:4]] == [s["completion"] for s in full[1:4]]
    assert json.loads((out / "summary.json").read_text())["num_tasks"] == 6
    # A smaller --limit on the finished folder: the summary counts the first 2 tasks, the files
    # keep all 6, nothing is generated again.
    results = read_rows(out / "results.jsonl")
    proc = run_eval(*common, "--limit", "2")
    assert "4 finished tasks outside --limit" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num_tasks"], summary["num_samples"]) == (2, 2)
    assert summary["passed_tasks"] == sum(r["passed"] for r in results[:2])
    assert read_rows(out / "results.jsonl") == results
    assert read_rows(out / "samples.jsonl") == samples
    proc = run_eval(*common[:-2], "--batch_size", "2", "--max_new_tokens", "8", check=False)
    assert proc.returncode == 2 and "other settings (max_new_tokens)" in proc.stderr
    run_eval(*common[:-4], "--max_new_tokens", "8", "--batch_size", "2", "--overwrite")
    assert json.loads((out / "summary.json").read_text())["settings"]["max_new_tokens"] == 8


def test_compare_prints_table_diff_and_saves_chart(tmp_path):
    tasks = humaneval_tasks()[:4]
    write_jsonl(tmp_path / "p.jsonl", tasks)
    good = [{"task_id": t["task_id"], "completion": t["canonical_solution"]} for t in tasks]
    bad = [{"task_id": t["task_id"], "completion": "    return None\n"} for t in tasks]
    bad[0] = good[0]
    for name, rows in (("a", good), ("b", bad)):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        run_eval(
            "--problems",
            tmp_path / "p.jsonl",
            "--samples",
            tmp_path / f"{name}.jsonl",
            "--output_dir",
            tmp_path / name,
            "--method",
            name.upper(),
        )
    chart = tmp_path / "chart.png"
    out = run_eval("--compare", tmp_path / "a", tmp_path / "b", "--chart", chart).stdout
    assert "| A | 1.000 | 4 / 4 |" in out and "| B | 0.250 | 1 / 4 |" in out
    assert "only " + str(tmp_path / "a") + ": 3" in out
    assert chart.stat().st_size > 1000 and chart.read_bytes()[:4] == b"\x89PNG"


def test_humaneval_test_split_runs_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir):
    from coderl.hub_data import load_humaneval, split_humaneval

    _, test = split_humaneval(load_humaneval())
    write_jsonl(tmp_path / "humaneval_test.jsonl", test)
    run_eval(
        "--model",
        tiny_model_dir,
        "--problems",
        tmp_path / "humaneval_test.jsonl",
        "--output_dir",
        tmp_path / "he",
        "--max_new_tokens",
        "8",
        "--batch_size",
        "11",
    )
    summary = json.loads((tmp_path / "he" / "summary.json").read_text())
    assert summary["num_tasks"] == 33
    assert sum(summary["status_counts"].values()) == 33
    assert "infra_error" not in summary["status_counts"]


def test_fenced_completions_are_scored_as_their_block_and_say_so(tmp_path):
    """Instruct models answer in a markdown fence. Scored as written, a fenced C++ program is a
    compile error and a fenced Python function a syntax error; scored as the block instruct-mode
    generation extracts, they pass, and the result line records the extraction. A completion that
    is valid code as it stands is scored untouched."""
    from coderl.toy_tasks import generate_toy_cpp, generate_toy_python

    cpp = generate_toy_cpp(n_train=1, n_test=1, seed=0)[1][0]
    py = generate_toy_python(n_train=1, n_test=1, seed=0)[1][0]
    fn = humaneval_tasks()[0]
    problems = tmp_path / "p.jsonl"
    write_jsonl(problems, [cpp, py, fn])
    whole_function = fn["prompt"] + fn["canonical_solution"]
    samples = [
        {"task_id": cpp["task_id"], "completion": f"Here:\n```cpp\n{cpp['canonical_solution']}```\n"},
        {"task_id": py["task_id"], "completion": f"```python\n{py['prompt']}{py['canonical_solution']}```"},
        {"task_id": fn["task_id"], "completion": f"Sure.\n```python\n{whole_function}```\nDone."},
        {"task_id": fn["task_id"], "completion": fn["canonical_solution"]},
        {"task_id": fn["task_id"], "completion": '    """```"""\n' + fn["canonical_solution"]},
    ]  # fmt: skip
    write_jsonl(tmp_path / "s.jsonl", samples)
    run_eval(
        "--problems", problems, "--samples", tmp_path / "s.jsonl", "--output_dir", tmp_path / "o"
    )
    rows = read_rows(tmp_path / "o" / "results.jsonl")
    assert [r["status"] for r in rows] == ["passed"] * 5
    assert [r.get("extracted") for r in rows] == ["fenced_block"] * 3 + [None, None]


def test_status_names_rows_and_restarts_an_evaluation_of_another_checkpoint(
    tmp_path, tiny_model_dir, toy_file
):
    """What the pipelines rely on to skip or redo an evaluation: --status says missing, current,
    finished (row gone from the table), partial and changed (the checkpoint's content changed at
    the same path); a changed folder is refused, or started over with --restart_changed; a
    current one is reported again without generating; --name names the row."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out, table = tmp_path / "eval", tmp_path / "table.md"
    common = ["--model", model, "--name", "sft", "--problems", toy_file, "--output_dir", out]
    common += ["--table", table, "--max_new_tokens", "8", "--batch_size", "3"]

    def status():
        return run_eval(*common, "--status").stdout.strip()

    assert status() == "missing"
    run_eval(*common)
    assert status() == "current"
    assert "| `sft` |" in table.read_text() and str(model) not in table.read_text()
    table.write_text(table.read_text().replace("| `sft` |", "| `other` |"))
    assert status() == "finished"
    samples = (out / "samples.jsonl").read_text()
    proc = run_eval(*common)  # reported again from its files: no model loaded, nothing generated
    assert "reporting it again" in proc.stderr and "| `sft` |" in table.read_text()
    assert (out / "samples.jsonl").read_text() == samples and status() == "current"
    write_jsonl(out / "results.jsonl", read_rows(out / "results.jsonl")[:2])
    assert status() == "partial"
    run_eval(*common)
    assert status() == "current"
    config = model / "config.json"
    config.write_text(config.read_text().replace("}", ', "note": "retrained"}', 1))
    assert status() == "changed"
    proc = run_eval(*common, check=False)
    assert proc.returncode == 2 and "other settings (checkpoint)" in proc.stderr
    proc = run_eval(*common, "--restart_changed")
    assert "resuming" not in proc.stderr and status() == "current"
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["name"] == "sft" and settings["checkpoint"] and settings["problems_content"]
