"""experiments.py unchanged under torchrun: 2 CPU processes (gloo) give the results of one process.

``torchrun --nproc-per-node 2 experiments.py --dataset fashion-mnist --methods online-contrastive,online-triplet
--quick`` runs in a subprocess, on the system's Fashion-MNIST where it is installed and on the IDX fixture
where it is not, beside the same command in one process. Every rank draws the same global batches
(DistributedBalancedBatchSampler) and the online losses mine over the whole of them, so the two runs
train the same model up to float rounding, and rank 0's results equal the single process's. Rank 0 alone
prints and writes; the same command run again finds the finished rows in the run folders, and finishes a
run that one process left unfinished. A folder of your own images trains the same way.

The README's command for two machines (``torchrun --nnodes 2 ... --rdzv-backend c10d --rdzv-endpoint
HOST0:29400 --rdzv-id study experiments.py ... --run-dir /shared/checkpoints``) runs here as two launches
of one process each on 127.0.0.1, each in its own working folder, the run folder shared: it trains the
model one process trains, and rank 0's node alone writes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from known_datasets import SYSTEM_DATA_DIRS, find_idx_files
from fixtures import write_idx_fixture
from launch import clean_environment, free_port, launcher
from model_file import load_model
from test_own_images import write_folder

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ["--dataset", "fashion-mnist", "--methods", "online-contrastive,online-triplet", "--quick",
           "--no-progress", "--root", "data"]
# How far float rounding alone moves a quick run. Adam's first steps move each weight by about the
# learning rate in the direction of its gradient's sign, so a gradient that rounding pushes across zero
# moves that weight by up to 2e-3, and hard-negative mining is discontinuous in the weights. Measured
# here: the same one-process command with 1 and with 2 threads (other summation orders, nothing else)
# ends with weights up to 1.7e-3 apart and P@1 0.002 apart; two processes against one, 2.2e-3 and 0.001,
# with kNN accuracy and NMI up to 0.008 apart (k-means and 2-D neighbours flip together), the mean
# training loss 2.4e-4 apart relatively, and the random-hard validation loss 2.2% apart (its negatives
# are drawn at random among the hard ones, a set that moves with the weights).
SCORE_TOLERANCE = 0.02  # absolute, for fractions of the 1000 test items
TRAIN_LOSS_TOLERANCE = 1e-3  # relative
VAL_LOSS_TOLERANCE = {"online-contrastive": 1e-3, "online-triplet/random-hard": 0.05}  # relative
SCORES = ("precision_at_1", "r_precision", "map_at_r", "knn_accuracy", "nmi", "roc_auc")
QUICK = os.path.join("runs", "fashion-mnist", "quick")  # where a quick run writes (results.output_dirs)
RUN_FOLDERS = os.path.join(QUICK, "checkpoints", "fashion-mnist-quick")


def torchrun(work, *arguments, timeout=600):
    """experiments.py with ``arguments`` on 2 processes in ``work``: the completed process."""
    return subprocess.run(launcher(2) + [os.path.join(REPOSITORY, "experiments.py"), *arguments], cwd=work,
                          env=clean_environment(REPOSITORY), capture_output=True, text=True, timeout=timeout)


def one_process(work, *arguments, timeout=600):
    return subprocess.run(launcher(1) + [os.path.join(REPOSITORY, "experiments.py"), *arguments], cwd=work,
                          env=clean_environment(REPOSITORY), capture_output=True, text=True, timeout=timeout)


def prepare(work):
    """A working folder whose ``data`` holds the IDX fixture unless the system has Fashion-MNIST."""
    work.mkdir()
    if not any(find_idx_files(folder, True) for folder in SYSTEM_DATA_DIRS["fashion-mnist"]):
        write_idx_fixture(work / "data")
    return work


def rows(work):
    with open(work / QUICK / "results" / "fashion-mnist.json") as file:
        return {row["method"]: row for row in json.load(file)}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The folder of COMMAND's one-process run, the reference of every run on several processes here."""
    work = prepare(tmp_path_factory.mktemp("one-process") / "single")
    alone = one_process(work, *COMMAND)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def runs(tmp_path_factory, single):
    """(folder of the torchrun run, its process, folder of the one-process run)."""
    several = prepare(tmp_path_factory.mktemp("distributed-study") / "torchrun")
    distributed = torchrun(several, *COMMAND)
    assert distributed.returncode == 0, distributed.stdout[-3000:] + distributed.stderr[-3000:]
    return several, distributed, single


def assert_same_training(row, alone, method):
    """``row`` (of a run on several processes) trained the model of ``alone`` (the one-process row), up to
    float rounding."""
    for key in SCORES:
        assert row[key] == pytest.approx(alone[key], abs=SCORE_TOLERANCE), (method, key)
    assert row["final_train_loss"] == pytest.approx(alone["final_train_loss"], rel=TRAIN_LOSS_TOLERANCE)
    assert row["final_val_loss"] == pytest.approx(alone["final_val_loss"], rel=VAL_LOSS_TOLERANCE[method])
    assert alone["final_train_loss"] > 0  # the runs did train on something


def test_two_processes_give_the_results_of_one(runs):
    several, _, single = runs
    distributed, alone = rows(several), rows(single)
    assert sorted(distributed) == sorted(alone) == ["online-contrastive", "online-triplet/random-hard"]
    for method, row in alone.items():
        assert_same_training(distributed[method], row, method)


def launch_two_nodes(works, arguments, timeout=300):
    """experiments.py with ``arguments`` as the README's command for two machines: one launcher per folder
    of ``works`` (``--nnodes 2 --nproc-per-node 1``), started together, meeting at a c10d rendezvous on
    127.0.0.1 at one free port chosen here (both launchers take themselves for its host: the one that binds
    the port hosts the store, the other connects to it) under an id of their own. Each launcher's output
    goes to ``<work>.out`` / ``<work>.err`` beside its folder. Returns their exit statuses; once one fails,
    or ``timeout`` seconds have passed, both are killed with their workers (each runs in its own session)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
               "--rdzv-id", f"two-nodes-{uuid.uuid4().hex}", os.path.join(REPOSITORY, "experiments.py"), *arguments]
    processes = []
    try:
        for work in works:
            with open(f"{work}.out", "w") as out, open(f"{work}.err", "w") as err:
                processes.append(subprocess.Popen(command, cwd=work, env=clean_environment(REPOSITORY), stdout=out,
                                                  stderr=err, start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in processes) \
                and not any(p.poll() for p in processes):
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return [process.returncode for process in processes]


def test_two_launches_of_the_readme_command_for_two_machines_train_the_model_of_one_process(tmp_path, single):
    works = [prepare(tmp_path / f"node{k}") for k in range(2)]
    shared = tmp_path / "shared" / "checkpoints"
    command = ["--dataset", "fashion-mnist", "--methods", "online-triplet", "--quick", "--no-progress", "--root",
               "data", "--run-dir", str(shared)]
    statuses = launch_two_nodes(works, command)
    outputs = [(open(f"{work}.out").read(), open(f"{work}.err").read()) for work in works]
    assert statuses == [0, 0], "\n".join(f"node {k}: exit {status}\n{out[-3000:]}{err[-3000:]}"
                                          for k, (status, (out, err)) in enumerate(zip(statuses, outputs)))
    # rank 0's node alone prints and writes (which launch it is, the rendezvous decides); the other writes
    # nothing, neither in its folder nor beside it
    writers = [k for k, work in enumerate(works) if os.path.exists(work / "runs")]
    assert len(writers) == 1, writers
    writer, other = works[writers[0]], works[1 - writers[0]]
    assert sorted(os.listdir(other)) in ([], ["data"])
    assert outputs[writers[0]][0].count("== fashion-mnist: online-triplet/random-hard, 2-D, 1 epochs") == 1
    assert "== fashion-mnist" not in outputs[1 - writers[0]][0] and "Results in" not in outputs[1 - writers[0]][0]
    run_folder = shared / "fashion-mnist-quick" / "online-triplet-random-hard_2d_seed0"
    assert sorted(os.listdir(run_folder)) == ["checkpoint.pt", "row.json", "settings.json"]
    method = "online-triplet/random-hard"
    assert list(rows(writer)) == [method]
    assert_same_training(rows(writer)[method], rows(single)[method], method)


def test_rank_zero_alone_prints_and_writes(runs):
    several, process, _ = runs
    for method in ("online-contrastive", "online-triplet/random-hard"):
        assert process.stdout.count(f"== fashion-mnist: {method}, 2-D, 1 epochs") == 1
    assert process.stdout.count(f"Results in {os.path.join(QUICK, 'results', 'fashion-mnist.md')}") == 1
    assert sorted(os.listdir(several / QUICK / "results")) == ["fashion-mnist.json", "fashion-mnist.lock",
                                                               "fashion-mnist.md"]
    assert sorted(os.listdir(several)) == ["data", "runs"] or sorted(os.listdir(several)) == ["runs"]
    run_folders = sorted(os.listdir(several / RUN_FOLDERS))
    assert run_folders == ["online-contrastive_2d_seed0", "online-triplet-random-hard_2d_seed0"]
    for folder in run_folders:
        assert sorted(os.listdir(several / RUN_FOLDERS / folder)) == [
            "checkpoint.pt", "row.json", "settings.json"]


def test_the_same_command_again_reads_the_finished_rows(runs):
    several, _, _ = runs
    before = rows(several)
    again = torchrun(several, *COMMAND)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("finished before, row read from") == 2  # once per method: rank 0 only
    assert rows(several) == before


def test_a_run_interrupted_on_one_process_is_finished_under_torchrun(runs, tmp_path):
    _, _, single = runs
    work = tmp_path / "resumed"
    shutil.copytree(single, work)
    # as if the one-process run had been stopped after online-triplet's last checkpoint, before its row
    os.remove(work / RUN_FOLDERS / "online-triplet-random-hard_2d_seed0" / "row.json")
    shutil.rmtree(work / QUICK / "results")
    done = torchrun(work, *COMMAND)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("finished before, row read from") == 1  # online-contrastive
    assert done.stdout.count(f"resuming from {RUN_FOLDERS}") == 1  # online-triplet, by rank 0 alone
    assert rows(work) == rows(single)  # the same weights, evaluated by rank 0: the same row


def test_your_own_images_train_under_torchrun_and_save_one_model_file(tmp_path):
    write_folder(tmp_path / "shapes")
    command = ["--dataset", str(tmp_path / "shapes"), "--image-size", "20", "--epochs", "2", "--no-progress",
               "--embedding-dim", "4", "--methods", "online-triplet", "--held-out-classes", "yellow,purple"]
    (tmp_path / "several").mkdir()
    (tmp_path / "single").mkdir()
    distributed = torchrun(tmp_path / "several", *command, "--save-model", str(tmp_path / "model.pt"))
    assert distributed.returncode == 0, distributed.stdout[-3000:] + distributed.stderr[-3000:]
    alone = one_process(tmp_path / "single", *command)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    model, info = load_model(tmp_path / "model.pt")
    assert info["class_names"] == ["blue", "green", "grey", "red"] and info["embedding_dim"] == 4
    # a folder of your own images: everything under runs/<folder name>/
    (row,), (expected,) = (json.loads((tmp_path / where / "runs" / "shapes" / "results" / "shapes.json").read_text())
                           for where in ("several", "single"))
    assert row["final_train_loss"] == pytest.approx(expected["final_train_loss"], rel=TRAIN_LOSS_TOLERANCE)
    assert row["held_out_n_way"] == expected["held_out_n_way"] == 2
    assert distributed.stdout.count("Model saved to") == 1
