"""Run folders: one method's resumable run of the study on disk, and what it may be reused for.

A run folder holds ``settings.json`` (``RUN_SETTINGS``: what the run trains, on which data), the
checkpoint ``trainer.fit`` writes after every epoch and, once the run finished, ``row.json``
(``RUN_ROW``: its result row). The same command run again reads a finished row back, resumes an
unfinished run, and refuses a folder whose settings or data differ, with a message saying what to do.
A row is reused only when it provably comes from the same settings and data: the settings file records
every setting (format ``RUN_SETTINGS_VERSION``) and, for a folder of your own images, the data's
identity (``image_folders.folder_identity``: resolved path and a fingerprint of the file list and labels).

Older settings files are read through ``upgrade_run_settings``, the one function that turns any earlier
format into the current one. (Checkpoints have their own format and upgrade; see ``trainer.fit``.)
"""

import json
import os
import shutil

from checkpoints import CHECKPOINT_NAME
from image_folders import folder_identity
from results import write_json

RUN_SETTINGS, RUN_ROW = "settings.json", "row.json"
RUN_SETTINGS_VERSION = 2
FOLDER_OPTIONS = ("image_size", "channels", "held_out_classes", "val_fraction", "skip_bad_images")
# Format 1 (no version) recorded these settings only when they were not the classic study's, so that its
# earlier files kept matching: the values a missing one meant, frozen as that format defined them.
_FORMAT_1_CLASSIC = {"network": "embedding-net", "pretrained": None, "amp": None, "compile": False,
                     "margin": 1.0, "soft": False, "distance": "squared", "batch_norm": False,
                     "easy_selector": None, "batch_samples": 25, "lr_step": 8}


def upgrade_run_settings(settings):
    """A run's settings (a dict read from ``RUN_SETTINGS``, or a result row's settings) in the current format
    (``RUN_SETTINGS_VERSION``): every setting present, ``"data"`` (the data's identity, None for a dataset
    known by name or when the old file did not record it) and ``"format_version"``.

    Format 1 (no ``format_version``) left out the network, mixed precision, recipe and learning-rate step when
    they were the classic ones, and the batch shape when it was the classic 25 images per class: they are
    filled in with those values. A recipe's cross-batch memory (``memory``, ``memory_warmup``), added later, is
    recorded in any format only when the run has one, so a file without it means none and needs no upgrade.
    Raises ValueError for a format newer than this library reads."""
    version = settings.get("format_version", 1)
    if version > RUN_SETTINGS_VERSION:
        raise ValueError(f"run settings of format {version} were written by a newer version of this library "
                         f"(this one reads up to {RUN_SETTINGS_VERSION}); update it, or run with --fresh")
    if version == 1:
        settings = {**_FORMAT_1_CLASSIC, **settings, "data": None}
    return {**settings, "format_version": RUN_SETTINGS_VERSION}


def data_identity(dataset, known, folder_options=None):
    """What a run folder records of its data: None for a dataset ``known`` by name, else the folder's
    ``image_folders.folder_identity`` with the ``FOLDER_OPTIONS`` of ``folder_options`` that shape its splits."""
    if known:
        return None
    options = {key: value for key, value in (folder_options or {}).items() if key in FOLDER_OPTIONS}
    return {**folder_identity(dataset), "options": options}


def open_run(run_dir, settings, fresh=False):
    """Prepare the run folder ``run_dir`` for a run with ``settings`` (current format, see
    ``upgrade_run_settings``): with ``fresh``, delete it first; record the settings in a folder where nothing
    was trained yet. Returns the finished row when the folder holds one, else None. Raises ValueError, saying
    what to do, when the folder holds a run with other settings or other data."""
    if fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    settings_path = os.path.join(run_dir, RUN_SETTINGS)
    trained = any(os.path.exists(os.path.join(run_dir, name)) for name in (CHECKPOINT_NAME, RUN_ROW))
    settings = json.loads(json.dumps(settings))
    if os.path.exists(settings_path) and trained:  # a folder where nothing was trained yet is simply reused
        with open(settings_path) as file:
            started = upgrade_run_settings(json.load(file))
        if started != settings:
            raise ValueError(_refusal(run_dir, started, settings))
    else:
        write_json(settings_path, settings)
    row_path = os.path.join(run_dir, RUN_ROW)
    if not os.path.exists(row_path):
        return None
    with open(row_path) as file:
        return json.load(file)


def record_finished_row(run_dir, row):
    """Record the finished ``row`` in ``run_dir`` (last, once every other output of the run is written)."""
    return write_json(os.path.join(run_dir, RUN_ROW), row)


def _refusal(run_dir, started, settings):
    """Why the run folder ``run_dir`` started with ``started`` cannot serve a run with ``settings``."""
    then, now = started.get("data"), settings.get("data")
    if then != now and (then is None or now is None):
        trained_on = (f"the folder of images {then['path']}" if then is not None else "data it did not record "
                      "(a dataset known by name, or a folder before run folders recorded theirs)")
        return f"{run_dir} holds a run on {trained_on}; run with --fresh to start over, or give another --run-dir"
    if then != now and then["path"] != now["path"]:
        return (f"{run_dir} holds a run on another folder of images ({then['path']}), not {now['path']}; give "
                "another --out-dir (or --run-dir) to keep both, or run with --fresh to replace it")
    if then != now and then["options"] != now["options"]:
        return (f"{run_dir} holds a run on {now['path']} read with other options ({then['options']}); run with "
                "the same options, or with --fresh to start over")
    if then != now:
        return (f"the images in {now['path']} changed since {run_dir} trained on them ({then['images']} images of "
                f"{then['classes']} classes then, {now['images']} of {now['classes']} now); run with --fresh to "
                "train on them anew, or give another --run-dir")
    changed = sorted(key for key in settings.keys() | started.keys() if started.get(key) != settings.get(key))
    return (f"{run_dir} holds a run started with other settings ({', '.join(changed)}: "
            f"{[started.get(key) for key in changed]}); run with --fresh to start over, or give another --run-dir")
