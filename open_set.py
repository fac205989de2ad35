"""Open-set matching at a calibrated precision: the nearest gallery label is accepted when its distance is at
most a threshold, else the answer is ``UNKNOWN``; the threshold is calibrated on labelled queries whose
classes the gallery may lack, and stored in the gallery file.

The decision calibrated here is the nearest-neighbour match: a query is *accepted* when the distance to its
nearest labelled gallery image is <= t, and an accepted query is *correct* when that image's class is the
query's own. Over a calibration set of Q queries, of which ``n_known`` have a class the gallery holds,
precision(t) = correct accepted / accepted and recall(t) = correct accepted / n_known; an accepted query of a
class the gallery lacks is an error. The curve is evaluated at every distinct nearest distance (the only
places it changes); a threshold equal to a distance accepts that query, so tied queries are accepted or
rejected together and the curve has one point per distinct distance.

The gallery file (``gallery.py``) keeps the calibration in three keys: ``calibration_precisions`` (P,)
float64, ascending, ``calibration_thresholds`` (P,) float64, the threshold of each, and ``calibration_curve``
(T, 3) float64, columns (threshold distance, precision, recall), ascending by distance.
"""

import math
import os

import numpy as np

from utils import atomic_write

UNKNOWN = "unknown"
CALIBRATION_KEYS = ("calibration_precisions", "calibration_thresholds", "calibration_curve")


def _check_precisions(precisions):
    """``precisions`` (a number or a sequence of numbers in (0, 1]) as a sorted float64 array without repeats."""
    if isinstance(precisions, np.ndarray):
        precisions = precisions.tolist()  # a 0-d array becomes a number, others a list
    values = [precisions] if np.ndim(precisions) == 0 else list(precisions)
    if not values:
        raise ValueError("no precision given; pass at least one, e.g. --precision 0.95")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                or not 0 < float(value) <= 1:
            raise ValueError(f"precision must be a number in (0, 1], e.g. 0.95; got {value!r}")
    return np.unique(np.asarray(values, dtype=np.float64))


def match_outcomes(nearest_labels, true_labels, gallery_classes):
    """Whether each query's nearest gallery label is right, and whether the gallery holds its class.

    Takes nearest_labels (list of Q class names: each query's nearest labelled gallery image's class),
    true_labels (list of Q class names: each query's own class) and gallery_classes (the gallery's class
    names). Returns (correct (Q,) bool array, known (Q,) bool array).
    """
    if len(nearest_labels) != len(true_labels):
        raise ValueError(f"nearest_labels and true_labels must be as long, got {len(nearest_labels)} and "
                         f"{len(true_labels)}")
    held = {str(name) for name in gallery_classes}
    correct = np.array([str(a) == str(b) for a, b in zip(nearest_labels, true_labels)], dtype=bool)
    known = np.array([str(name) in held for name in true_labels], dtype=bool)
    return correct, known


def precision_recall_curve(nearest_distances, correct, known):
    """The precision/recall curve of "accept the nearest label when its distance is <= t" over every t.

    Takes nearest_distances (Q,) (finite, float), correct (Q,) bool and known (Q,) bool (``match_outcomes``).
    Returns a (T, 3) float64 array, one row per distinct distance t, ascending: (t, precision(t), recall(t))
    as defined in the module docstring. Vectorised: one sort by distance, cumulative sums, and the last
    position of each run of equal distances. Raises ValueError for no queries, non-finite distances, a
    correct query of an unknown class, or no query of a class the gallery holds (recall is then undefined).
    """
    distances = np.asarray(nearest_distances, dtype=np.float64).reshape(-1)
    correct, known = np.asarray(correct, dtype=bool), np.asarray(known, dtype=bool)
    if not len(distances) == len(correct) == len(known):
        raise ValueError(f"nearest_distances, correct and known must be as long, got {len(distances)}, "
                         f"{len(correct)} and {len(known)}")
    if len(distances) == 0:
        raise ValueError("no calibration queries; pass a folder with at least one labelled image")
    if not np.isfinite(distances).all():
        raise ValueError("nearest_distances must be finite")
    if (correct & ~known).any():
        raise ValueError("a query counted correct has a class the gallery lacks; correct and known disagree")
    n_known = int(known.sum())
    if n_known == 0:
        raise ValueError("none of the calibration queries has a class the gallery holds, so no threshold has a "
                         "precision above 0; calibrate with images of the gallery's classes (and unseen ones)")
    order = np.argsort(distances, kind="stable")
    sorted_distances = distances[order]
    correct_so_far = np.cumsum(correct[order])
    # the last query of each run of equal distances: a threshold accepts the whole run or none of it
    ends = np.flatnonzero(np.append(sorted_distances[1:] != sorted_distances[:-1], True))
    accepted = ends + 1
    return np.stack([sorted_distances[ends], correct_so_far[ends] / accepted, correct_so_far[ends] / n_known],
                    axis=1)


def thresholds_for(curve, precisions):
    """For each requested precision p, the largest threshold of ``curve`` whose precision is >= p.

    Takes curve (T, 3) (``precision_recall_curve``) and precisions (a number or sequence in (0, 1]). Returns
    (precisions (P,) float64 ascending without repeats, thresholds (P,) float64). A threshold is a distance
    of the calibration set, and accepting nothing is never offered (its precision is undefined): when no
    threshold reaches p, ValueError names the best precision any threshold reaches. Precisions are compared
    as float64 quotients, so 19 correct of 20 accepted reaches 0.95.
    """
    precisions = _check_precisions(precisions)
    best = float(curve[:, 1].max())
    thresholds = np.empty_like(precisions)
    for position, precision in enumerate(precisions):
        reaching = np.flatnonzero(curve[:, 1] >= precision)
        if len(reaching) == 0:
            advice = (f"ask for {math.floor(best * 1000) / 1000:g} or less" if best >= 0.001 else
                      "no accepted query is ever right: check that the calibration folder's class names are the "
                      "gallery's")
            raise ValueError(f"no threshold reaches precision {precision:g} on the calibration set: the best "
                             f"reachable is {best:.4f}; {advice}")
        thresholds[position] = curve[reaching[-1], 0]
    return precisions, thresholds


def calibrate(nearest_distances, nearest_labels, true_labels, gallery_classes, precisions):
    """The calibration of the nearest-neighbour match decision on labelled queries.

    Takes nearest_distances (Q,), nearest_labels and true_labels (lists of Q class names), gallery_classes
    (the gallery's class names) and precisions (a number or sequence in (0, 1]). Returns a dict of the three
    gallery keys (``CALIBRATION_KEYS``, see the module docstring) as float64 arrays.
    """
    correct, known = match_outcomes(nearest_labels, true_labels, gallery_classes)
    curve = precision_recall_curve(nearest_distances, correct, known)
    precisions, thresholds = thresholds_for(curve, precisions)
    return {"calibration_precisions": precisions, "calibration_thresholds": thresholds, "calibration_curve": curve}


def curve_at(curve, threshold):
    """(precision, recall) of ``curve`` (T, 3) at ``threshold``: its last row at a distance <= threshold
    (precision NaN and recall 0 below its first distance: nothing accepted)."""
    row = np.searchsorted(curve[:, 0], threshold, side="right") - 1
    return (float("nan"), 0.0) if row < 0 else (float(curve[row, 1]), float(curve[row, 2]))


def calibrated_thresholds(gallery):
    """The calibrated thresholds of ``gallery`` (a dict as ``gallery.load_gallery`` returns): ``{precision
    (float): threshold distance (float)}``, empty for an uncalibrated gallery. ValueError when its calibration
    keys are partial or disagree in shape."""
    present = [key for key in CALIBRATION_KEYS if key in gallery]
    if not present:
        return {}
    precisions = np.asarray(gallery.get("calibration_precisions", []))
    thresholds = np.asarray(gallery.get("calibration_thresholds", []))
    curve = np.asarray(gallery.get("calibration_curve", np.empty((0, 0))))
    if len(present) != len(CALIBRATION_KEYS) or precisions.ndim != 1 or precisions.shape != thresholds.shape \
            or curve.ndim != 2 or curve.shape[1:] != (3,):
        raise ValueError("the gallery's calibration keys (" + ", ".join(CALIBRATION_KEYS) + ") are incomplete or "
                         "disagree; calibrate it again with `python search.py calibrate MODEL GALLERY FOLDER`")
    return {float(p): float(t) for p, t in zip(precisions, thresholds)}


def threshold_at(gallery, precision, gallery_path):
    """The threshold distance ``gallery`` was calibrated to for ``precision``; ValueError naming the precisions
    it holds and the command that calibrates it otherwise (``gallery_path`` names the file in the message)."""
    if np.ndim(precision) != 0:
        raise ValueError(f"precision must be one number in (0, 1], e.g. 0.95; got {precision!r}")
    precision = float(_check_precisions(precision)[0])
    thresholds = calibrated_thresholds(gallery)
    if precision not in thresholds:
        held = ", ".join(f"{value:g}" for value in thresholds) or "none"
        raise ValueError(f"{gallery_path} is not calibrated for precision {precision:g} (it holds: {held}); run "
                         f"`python search.py calibrate MODEL {gallery_path} FOLDER --precision {precision:g}` "
                         "with a labelled folder of calibration images")
    return thresholds[precision]


def open_set_labels(nearest_distances, nearest_labels, threshold):
    """The open-set answer of each query: its nearest label where its distance is <= threshold, else UNKNOWN.

    Takes nearest_distances ((Q,) float tensor or array), nearest_labels (list of Q class names) and threshold
    (float). Returns a list of Q str.
    """
    distances = np.asarray(nearest_distances, dtype=np.float64).reshape(-1)
    if len(distances) != len(nearest_labels):
        raise ValueError(f"nearest_distances and nearest_labels must be as long, got {len(distances)} and "
                         f"{len(nearest_labels)}")
    return [str(label) if distance <= threshold else UNKNOWN for distance, label in zip(distances, nearest_labels)]


def open_set_scores(answers, true_labels, gallery_classes):
    """How open-set answers score against the truth.

    Takes answers (list of Q str: a class name or UNKNOWN), true_labels (list of Q class names) and
    gallery_classes. Returns a dict: ``precision`` (correct / accepted, NaN when nothing is accepted),
    ``recall`` (correct / queries of a class the gallery holds, NaN when there are none), ``unseen_rejected``
    (share of the queries of a class the gallery lacks answered UNKNOWN, NaN when there are none) and the
    counts ``n_queries``, ``n_seen``, ``n_unseen``, ``n_accepted``, ``n_correct``.
    """
    correct, known = match_outcomes(answers, true_labels, gallery_classes)
    accepted = np.array([answer != UNKNOWN for answer in answers], dtype=bool)
    n_accepted, n_correct, n_seen = int(accepted.sum()), int(correct.sum()), int(known.sum())
    n_unseen = len(answers) - n_seen
    return {"precision": n_correct / n_accepted if n_accepted else float("nan"),
            "recall": n_correct / n_seen if n_seen else float("nan"),
            "unseen_rejected": int((~accepted & ~known).sum()) / n_unseen if n_unseen else float("nan"),
            "n_queries": len(answers), "n_seen": n_seen, "n_unseen": n_unseen, "n_accepted": n_accepted,
            "n_correct": n_correct}


def save_calibration(gallery_path, calibration):
    """Write ``calibration`` (``calibrate``'s dict) into the gallery file at ``gallery_path``, replacing any
    earlier calibration and keeping every other key as it is; written to a temporary file and renamed, so an
    interruption leaves the old file. Returns the path."""
    gallery_path = os.fspath(gallery_path)
    with np.load(gallery_path, allow_pickle=False) as file:
        arrays = {key: file[key] for key in file.files if key not in CALIBRATION_KEYS}
    arrays.update({key: np.asarray(calibration[key], dtype=np.float64) for key in CALIBRATION_KEYS})
    with atomic_write(gallery_path) as file:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(file, **arrays)
    return gallery_path


def plot_curve(curve, precisions, thresholds, path):
    """Save a figure of the calibration curve to ``path``: precision and recall against the distance threshold,
    each chosen threshold (``thresholds`` (P,), for ``precisions`` (P,)) a dashed line. Returns the path."""
    from matplotlib.figure import Figure  # a bare Figure, not pyplot: no backend switch

    from results import save_figure

    figure = Figure(figsize=(6.4, 4.2))
    axis = figure.subplots()
    axis.plot(curve[:, 0], curve[:, 1], label="precision", drawstyle="steps-post")
    axis.plot(curve[:, 0], curve[:, 2], label="recall", drawstyle="steps-post")
    for precision, threshold in zip(precisions, thresholds):
        axis.axvline(threshold, color="grey", linestyle="--", linewidth=0.8)
        axis.annotate(f"P>={precision:g}\nt={threshold:.3f}", (threshold, 0.02), fontsize=7, ha="right",
                      rotation=90, va="bottom")
    axis.set_xlabel("threshold on the nearest gallery distance")
    axis.set_ylabel("share")
    axis.set_ylim(0, 1.02)
    axis.set_title("open-set match: accept the nearest label when distance <= threshold", fontsize=9)
    axis.legend(loc="best")
    return save_figure(figure, path)
