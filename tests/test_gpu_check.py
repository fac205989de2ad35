"""benchmarks/gpu_check.sh, the prepared GPU check, parses and runs its dry mode on a CPU: the tests
marked ``cuda`` are selected (and skip here), and the measuring script writes its JSON."""

import json
import os
import subprocess
import sys

import torch

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPOSITORY, "benchmarks", "gpu_check.sh")
sys.path.insert(0, os.path.join(REPOSITORY, "benchmarks"))

import gpu_check  # noqa: E402


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_the_dry_mode_runs_on_the_cpu_and_writes_one_json(tmp_path):
    done = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), "--cpu"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "out" / "gpu_check.json") as file:
        report = json.load(file)
    assert report["device"] == "cpu"
    counts = report["cuda_tests"]
    if not torch.cuda.is_available():
        assert counts["tests"] == counts["skipped"] > 0 and counts["failures"] == counts["errors"] == 0
    selectors = {(row["batch"], row["selector"]) for row in report["selectors"]}
    assert selectors == {(batch, name) for batch in gpu_check.DRY_BATCHES for name in gpu_check.SELECTOR_NAMES}
    assert [row["way"] for row in report["epoch"]] == list(gpu_check.EPOCH_WAYS)
    assert all(row["library_s"] > 0 and row["floor_s"] > 0 for row in report["epoch"])
    assert "1. Selectors" in done.stdout and "2. One online-triplet epoch" in done.stdout


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
