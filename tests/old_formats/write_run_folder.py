"""Writes tests/old_formats/run_folder/: finished run folders of format 1 (no version; settings recorded only
when not the classic value), as the library wrote them before run folders had a format version.

Run from a checkout of that library (the commit before the version), with this repository's tests on the
path for the IDX fixture:

    cd <old checkout> && OMP_NUM_THREADS=1 PYTHONPATH=.:<this repository>/tests \
        .venv/bin/python <this repository>/tests/old_formats/write_run_folder.py <this repository>/tests/old_formats/run_folder

Two one-epoch runs on the IDX fixture (tests/fixtures.py, 25 images per class and split): online-contrastive
with the classic settings (nothing but the core settings recorded) and online-triplet/batch-hard with its study
recipe and learning-rate step 3 (recipe fields and lr_step recorded). Only settings.json and row.json are kept
(the checkpoints are megabytes); a test reads each finished row back with the current code.
"""

import os
import shutil
import sys
import tempfile

import experiments
from fixtures import write_idx_fixture

RUNS = {"online-contrastive": dict(method="online-contrastive"),
        "online-triplet-batch-hard": dict(method="online-triplet", selector="batch-hard", lr_step=3)}


def main(destination):
    with tempfile.TemporaryDirectory() as work:
        write_idx_fixture(os.path.join(work, "data"), 25, 25)
        splits = experiments.load_splits("mnist", os.path.join(work, "data"))
        for name, arguments in RUNS.items():
            run_dir = os.path.join(work, name)
            experiments.run_method("mnist", epochs=1, splits=splits, images_dir=None, results_dir=None,
                                   progress=False, run_dir=run_dir, **arguments)
            os.makedirs(os.path.join(destination, name), exist_ok=True)
            for kept in ("settings.json", "row.json"):
                shutil.copy(os.path.join(run_dir, kept), os.path.join(destination, name, kept))


if __name__ == "__main__":
    main(sys.argv[1])
