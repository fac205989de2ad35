"""The study's runner survives faults. Killed with SIGKILL in the middle of a method (a real
subprocess, on the IDX fixture) and run again with the same command, it skips the method that
finished, resumes the interrupted one from its last checkpoint and writes the results table an
uninterrupted run writes; ``--fresh`` starts over; a run folder started with other settings is
refused with a message that says what to do."""

import json
import os
import signal
import subprocess
import sys

import pytest

import experiments
from fixtures import write_idx_fixture

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ["--dataset", "mnist", "--methods", "online-contrastive,online-triplet", "--selectors", "random-hard",
           "--epochs", "3", "--root", "data", "--no-progress"]
TIMINGS = ("seconds_per_epoch",)
# 3 epochs is not the study's 20: the run writes under its own output folder (results.output_dirs)
OUTPUTS = os.path.join("runs", "mnist", "epochs-3")

# Runs experiments.main with os.replace wrapped so that the process kills itself (SIGKILL: no cleanup,
# no finally blocks) right after the KILL_AFTER-th checkpoint file is moved into place.
KILLER = """
import os, signal, sys
sys.path.insert(0, {repository!r})
kill_after, moved, replace = int(os.environ["KILL_AFTER"]), [], os.replace

def replace_then_die(source, target, *args, **kwargs):
    replace(source, target, *args, **kwargs)
    if os.fspath(target).endswith("checkpoint.pt"):
        moved.append(target)
        if len(moved) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace_then_die
import experiments
experiments.main(sys.argv[1:])
"""


def run_study(work, *extra, kill_after=None):
    """Run the study command in ``work`` as a subprocess; returns (exit code, output)."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPOSITORY)
    if kill_after is None:
        command = [sys.executable, os.path.join(REPOSITORY, "experiments.py"), *COMMAND, *extra]
    else:
        environment["KILL_AFTER"] = str(kill_after)
        command = [sys.executable, "-c", KILLER.format(repository=REPOSITORY), *COMMAND, *extra]
    done = subprocess.run(command, cwd=work, env=environment, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def results(work, table="mnist"):
    with open(work / OUTPUTS / "results" / f"{table}.json") as file:
        return [{key: value for key, value in row.items() if key not in TIMINGS} for row in json.load(file)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    write_idx_fixture(work / "data", 25, 25)
    code, output = run_study(work)
    assert code == 0, output
    return work


def test_a_run_killed_mid_method_resumes_to_the_uninterrupted_results(uninterrupted, tmp_path):
    write_idx_fixture(tmp_path / "data", 25, 25)
    # 3 checkpoints finish online-contrastive; the 4th is online-triplet's first epoch of 3
    code, output = run_study(tmp_path, kill_after=4)
    assert code == -signal.SIGKILL, output
    run_dir = tmp_path / OUTPUTS / "checkpoints" / "mnist"
    first, second = run_dir / "online-contrastive_2d_seed0", run_dir / "online-triplet-random-hard_2d_seed0"
    assert (first / "row.json").is_file()
    assert (second / "checkpoint.pt").is_file() and not (second / "row.json").exists()

    code, output = run_study(tmp_path)
    assert code == 0, output
    assert "online-contrastive, 2-D: finished before" in output
    assert "online-triplet/random-hard, 2-D, 3 epochs, resuming from" in output
    assert "Epoch 1/3" not in output and "Epoch 2/3" in output  # only the epochs the kill lost
    assert results(tmp_path) == results(uninterrupted)


def test_fresh_starts_over_and_gives_the_same_results(uninterrupted, tmp_path):
    write_idx_fixture(tmp_path / "data", 25, 25)
    code, output = run_study(tmp_path, kill_after=2)
    assert code == -signal.SIGKILL, output
    code, output = run_study(tmp_path, "--fresh")
    assert code == 0, output
    assert "finished before" not in output and "resuming" not in output
    assert output.count("Epoch 1/3") == 2
    assert results(tmp_path) == results(uninterrupted)


def test_a_run_folder_with_other_settings_is_refused(tmp_path):
    write_idx_fixture(tmp_path / "data", 25, 25)
    splits = experiments.load_splits("mnist", tmp_path / "data", quick=True)
    run_dir = tmp_path / "run"
    arguments = dict(splits=splits, images_dir=None, results_dir=None, progress=False,
                     run_dir=str(run_dir))
    row = experiments.run_method("mnist", "online-contrastive", epochs=1, **arguments)
    assert json.loads((run_dir / "row.json").read_text()) == json.loads(json.dumps(row))
    again = experiments.run_method("mnist", "online-contrastive", epochs=1, **arguments)
    assert again == json.loads(json.dumps(row))  # read back, not retrained
    with pytest.raises(ValueError, match=r"other settings \(epochs.*--fresh"):
        experiments.run_method("mnist", "online-contrastive", epochs=2, **arguments)
    retrained = experiments.run_method("mnist", "online-contrastive", epochs=2, fresh=True, **arguments)
    assert retrained["epochs"] == 2


def test_a_run_with_a_cross_batch_memory_killed_mid_method_resumes_with_the_memory_it_had(tmp_path):
    """One 10 x 25 batch an epoch, the memory mined from the second step on: the resumed epochs mine the
    memory the checkpoint restored (without it they would mine only the batch and train otherwise)."""
    memory = ["--methods", "online-triplet", "--memory", "512", "--memory-warmup", "1"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    for work in (uninterrupted, interrupted):
        write_idx_fixture(work / "data", 25, 25)
    code, output = run_study(uninterrupted, *memory)
    assert code == 0, output
    code, output = run_study(interrupted, *memory, kill_after=1)
    assert code == -signal.SIGKILL, output
    code, output = run_study(interrupted, *memory)
    assert code == 0, output
    assert "resuming from" in output and "Epoch 1/3" not in output and "Epoch 2/3" in output
    rows = results(interrupted, "mnist-recipes")
    assert [row["recipe"] for row in rows] == ["memory 512, warm-up 1"]
    assert rows == results(uninterrupted, "mnist-recipes")
