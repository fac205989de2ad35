"""benchmarks/gpu_check.sh, the prepared GPU check, parses and runs its dry mode on a CPU: the tests
marked ``cuda`` are selected (and skip here), and the measuring script writes its JSON. Its time limits
add up to less than 6 minutes, and a stage out of time skips rows and names them, while the epoch table
always comes out (budgets of 0 s; a row that overruns its budget is cut)."""

import json
import os
import re
import subprocess
import sys
import time

import torch

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPOSITORY, "benchmarks", "gpu_check.sh")
MEASURING = os.path.join(REPOSITORY, "benchmarks", "gpu_check.py")
sys.path.insert(0, os.path.join(REPOSITORY, "benchmarks"))

import gpu_check  # noqa: E402

STAGES = ("selectors-small", "epoch", "selectors-large")
DRY_SELECTOR_ROWS = {(batch, name) for batch in gpu_check.DRY_SMALL_BATCHES + gpu_check.DRY_LARGE_BATCHES
                     for name in gpu_check.SELECTOR_NAMES}


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_the_time_limits_add_up_to_well_under_six_minutes():
    """The shell script's hard limits (each with the seconds ``timeout -k`` grants to stop) stay under 5.5
    minutes, and the measuring script's budgets leave its limit 25 s for start-up and a row that overruns."""
    with open(SCRIPT) as file:
        script = file.read()
    limits = {name: int(re.search(rf"^{name}=(\d+)$", script, re.M).group(1))
              for name in ("TESTS_LIMIT_S", "MEASURE_LIMIT_S")}
    kills = [int(k) for k in re.findall(r"timeout -s INT -k (\d+) ", script)]
    assert len(kills) == 2 and sum(limits.values()) + sum(kills) <= 330
    assert gpu_check.SELECTOR_BUDGET_S + gpu_check.EPOCH_BUDGET_S + 25 <= limits["MEASURE_LIMIT_S"]


def assert_complete_tables(report):
    """Every row of the dry run is measured or named as skipped, fp32 is measured, and the run finished."""
    assert report["status"] == "complete" and sorted(report["stages"]) == sorted(STAGES)
    skipped = report["skipped"]
    measured = {(row["batch"], row["selector"]) for row in report["selectors"]}
    not_measured = {(row["batch"], row["selector"]) for row in skipped if row["stage"].startswith("selectors")}
    assert measured | not_measured == DRY_SELECTOR_ROWS and not measured & not_measured
    ways = [row["way"] for row in report["epoch"]] + [row["way"] for row in skipped if row["stage"] == "epoch"]
    assert sorted(ways) == sorted(gpu_check.EPOCH_WAYS) and report["epoch"][0]["way"] == "fp32"
    assert all(row["library_s"] > 0 and row["floor_s"] > 0 and row["warm_up_s"] > 0 for row in report["epoch"])
    assert all(row["reason"] for row in skipped)
    for key in STAGES:
        assert report["stages"][key]["skipped"] == sum(row["stage"] == key for row in skipped)


def test_the_dry_mode_runs_on_the_cpu_and_writes_one_json(tmp_path):
    started = time.perf_counter()
    done = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), "--cpu"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.perf_counter() - started < 300  # far below the script's own limits
    with open(tmp_path / "out" / "gpu_check.json") as file:
        report = json.load(file)
    assert report["device"] == "cpu"
    counts = report["cuda_tests"]
    assert counts["exit_status"] == 0 and not counts["timed_out"]
    if not torch.cuda.is_available():
        assert counts["tests"] == counts["skipped"] > 0 and counts["failures"] == counts["errors"] == 0
    assert report["budgets"]["epoch_s"] == gpu_check.EPOCH_BUDGET_S
    assert_complete_tables(report)
    for title in ("### 1. Selectors at small batches", "### 2. One online-triplet epoch",
                  "### 3. Selectors at larger batches", "### Summary: selectors"):
        assert title in done.stdout
    assert "| way | warm-up s | library s | floor s | library / floor | fp32 / this |" in done.stdout


def test_a_budget_of_nothing_skips_every_row_it_may_and_says_so_but_the_epoch_table_comes_out(tmp_path):
    done = subprocess.run([sys.executable, MEASURING, "--out", str(tmp_path), "--cpu", "--selector-budget-s", "0",
                           "--epoch-budget-s", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "gpu_check.json") as file:
        report = json.load(file)
    assert_complete_tables(report)
    assert report["selectors"] == [] and [row["way"] for row in report["epoch"]] == ["fp32"]
    assert {row["reason"] for row in report["skipped"]} == {"budget of 0 s spent"}
    assert report["budgets"]["selectors_s"] == report["budgets"]["epoch_s"] == 0
    assert done.stdout.count("Skipped for lack of time") == 3
    assert "bf16, compiled, fp16 (budget of 0 s spent)" in done.stdout
    assert "| 256 | hard-negative pairs | skipped | skipped | (no time) |" in done.stdout
    assert re.search(r"^\| fp32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \| 1\.00x \|$", done.stdout, re.M)
    assert "| 512 | " + " | ".join(["skipped (time)"] * len(gpu_check.SELECTOR_NAMES)) + " |" in done.stdout


def forever(*args, **kwargs):
    while True:
        time.sleep(0.01)


def test_a_selector_row_that_overruns_the_budget_is_cut_and_the_rest_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "call_seconds", forever)
    report = gpu_check.Report(str(tmp_path / "gpu_check.json"), device="cpu")
    started = time.perf_counter()
    gpu_check.selector_stage(report, "selectors-small", "1. Selectors", 0.3, "cpu", (256,), 1)
    assert time.perf_counter() - started < 30
    reasons = [row["reason"] for row in report.data["skipped"]]
    assert reasons[0] == "cut when the budget of 0.3 s ran out"
    assert reasons[1:] == ["budget of 0.3 s spent"] * (len(gpu_check.SELECTOR_NAMES) - 1)
    assert "Skipped for lack of time, 6 rows" in capsys.readouterr().out
    with open(tmp_path / "gpu_check.json") as file:
        assert json.load(file)["stages"]["selectors-small"]["skipped"] == len(gpu_check.SELECTOR_NAMES)


def test_a_compilation_that_overruns_the_epoch_budget_costs_only_its_row_and_those_after(tmp_path, monkeypatch):
    def epoch_way(way, train_set, n_batches, device, progress):
        if way == "compiled":
            progress["phase"] = "warm-up (compilation included)"
            forever()
        return {"way": way, "batches": n_batches, "warm_up_s": 0.001, "library_s": 0.001, "floor_s": 0.001}

    monkeypatch.setattr(gpu_check, "epoch_way", epoch_way)
    report = gpu_check.Report(str(tmp_path / "gpu_check.json"), device="cpu")
    gpu_check.epoch_stage(report, 0.5, "cpu", None, 4)
    assert [row["way"] for row in report.data["epoch"]] == ["fp32", "bf16"]
    (compiled, fp16) = report.data["skipped"]
    assert compiled["way"] == "compiled" and re.fullmatch(
        r"cut in its warm-up \(compilation included\) after [\d.]+ s, when the budget of 0\.5 s ran out",
        compiled["reason"])
    assert (fp16["way"], fp16["reason"]) == ("fp16", "budget of 0.5 s spent")


def test_the_cuda_tests_cut_at_their_limit_are_reported_so(tmp_path):
    xml = tmp_path / "cuda_tests.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="0" errors="0" skipped="0"/></testsuites>')
    assert gpu_check.test_counts(str(xml), 124, 75) == {"tests": 3, "failures": 0, "errors": 0, "skipped": 0,
                                                        "exit_status": 124, "timed_out": True, "budget_s": 75}
    assert gpu_check.test_counts(str(tmp_path / "absent.xml"), 124, 75)["timed_out"]
    assert gpu_check.test_counts(None) is None


def test_bad_arguments_are_refused_with_the_usage(tmp_path):
    for arguments in ([], ["--cpu"], [str(tmp_path), "--gpu"]):
        done = subprocess.run(["bash", SCRIPT, *arguments], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and ("usage" in done.stderr or "--cpu" in done.stderr)


def test_without_fashion_mnist_the_epoch_runs_on_random_images_and_says_so(monkeypatch):
    def absent(*args, **kwargs):
        raise FileNotFoundError("no Fashion-MNIST here")

    monkeypatch.setattr(gpu_check.experiments, "load_splits", absent)
    train_set, data = gpu_check.training_set("data")
    assert data == "synthetic" and len(train_set) == 60000 and len(train_set.classes) == 10
    assert train_set.data.shape[1:] == (1, 28, 28)


def test_every_cuda_test_lives_in_the_file_the_script_collects():
    """gpu_check.sh collects tests/test_cuda.py alone (a bare GPU image may lack the notebook packages that
    other test files import), so a test marked cuda anywhere else would never run."""
    with open(SCRIPT) as file:
        assert "-m cuda tests/test_cuda.py " in file.read()
    marker = "pytest.mark." + "cuda"  # spelt apart, so that this file does not match itself
    tests = os.path.join(REPOSITORY, "tests")
    marked = []
    for name in sorted(os.listdir(tests)):
        if name.endswith(".py"):
            with open(os.path.join(tests, name)) as file:
                if marker in file.read():
                    marked.append(name)
    assert marked == ["test_cuda.py"]
