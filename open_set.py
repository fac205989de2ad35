"""Open-set answers: the nearest gallery label is accepted when its distance is within a calibrated threshold,
otherwise the answer is ``UNKNOWN``; and the thresholds a calibrated gallery file stores.

A calibrated gallery file holds ``calibration_precisions`` (P,) float64 and ``calibration_thresholds`` (P,)
float64 (the largest distance at which the nearest-neighbour match reaches each precision) beside
``calibration_curve`` (T, 3) float64 (threshold distance, precision, recall).
"""

import numpy as np

UNKNOWN = "unknown"


def calibrated_thresholds(gallery):
    """The thresholds of a gallery dict (as ``gallery.load_gallery`` returns it): ``{precision (float):
    threshold distance (float)}``, empty when the gallery is not calibrated. Raises ValueError when the
    precisions and thresholds stored do not agree in shape."""
    if "calibration_precisions" not in gallery:
        return {}
    precisions = np.asarray(gallery["calibration_precisions"], dtype=np.float64)
    thresholds = np.asarray(gallery.get("calibration_thresholds", ()), dtype=np.float64)
    if precisions.ndim != 1 or precisions.shape != thresholds.shape:
        raise ValueError(f"the gallery's calibration_precisions {precisions.shape} and calibration_thresholds "
                         f"{thresholds.shape} do not agree; calibrate the gallery again")
    return {float(precision): float(threshold) for precision, threshold in zip(precisions, thresholds)}


def open_set_labels(nearest_distances, nearest_labels, threshold):
    """The open-set answer of Q queries: takes nearest_distances (Q,) (float tensor or array: each query's
    distance to its nearest gallery item), nearest_labels (list of Q class names: that item's label) and
    threshold (float). Returns a list of Q str: the nearest label where its distance <= threshold, else
    ``UNKNOWN``. Raises ValueError when the two lengths differ."""
    distances = np.asarray(nearest_distances, dtype=np.float64).reshape(-1)
    if len(distances) != len(nearest_labels):
        raise ValueError(f"nearest_distances has {len(distances)} entries but nearest_labels {len(nearest_labels)}; "
                         "pass one of each per query")
    return [str(label) if distance <= threshold else UNKNOWN for distance, label in zip(distances, nearest_labels)]
