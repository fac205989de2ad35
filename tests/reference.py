"""Brute-force reference implementations of the selectors and losses, for tests and benchmarks.

Everything here is written straight from the definitions in the docstrings of utils.py and losses.py:
explicit Python loops over anchors, positives and negatives on plain Python lists, no
vectorisation, so each function can be checked by reading it. They are slow.

The selection references take the distance matrix D (B, B) as input instead of computing it, so a
test can hand them exactly the matrix the library sees (`utils.pdist(embeddings)`) and a
disagreement can only come from the selection logic, never from two distance formulas rounding
differently. A negative n of the pair (a, p) is "hard" when D[a, n] < D[a, p] + margin, with the
threshold D[a, p] + margin rounded in D's dtype as utils.py fixes it, using numpy scalars, which
round exactly like torch's elementwise float32/float64 arithmetic. D given as a plain list (for
example `ref_pdist` output) is taken as float32: pass such lists only when their values are exact
in float32.

At the end, `classic_style_*` functions mimic the shape of the classic siamese-triplet selector
(a Python loop over (anchor, positive) pairs with numpy over the negatives, same selection rules
as the references); the benchmark times them as a third point of comparison. They are not used
as references in the tests.
"""

import math

import numpy as np


# ----------------------------------------------------------------------------- helpers

def _to_list(values):
    """Return `values` (tensor, numpy array or sequence) as a plain Python list."""
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


def _scalar_type_of(D):
    """Return the numpy scalar type that rounds like D's dtype (float32 unless D says float64)."""
    dtype = str(getattr(D, "dtype", "float32"))
    return np.float64 if "float64" in dtype or "double" in dtype else np.float32


def _distance_rows(D, scalar_type=None):
    """Return D (B, B) as a list of lists of numpy scalars of `scalar_type` (inferred from D)."""
    if scalar_type is None:
        scalar_type = _scalar_type_of(D)
    return [[scalar_type(value) for value in row] for row in _to_list(D)], scalar_type


def ref_anchor_positive_pairs(labels):
    """Return every ordered pair (a, p), a != p, label[a] == label[p], in lexicographic order."""
    labels = _to_list(labels)
    pairs = []
    for a in range(len(labels)):
        for p in range(len(labels)):
            if a != p and labels[a] == labels[p]:
                pairs.append((a, p))
    return pairs


def ref_negatives_of(labels, anchor):
    """Return the indices n (ascending) with label[n] != label[anchor]."""
    labels = _to_list(labels)
    return [n for n in range(len(labels)) if labels[n] != labels[anchor]]


# ----------------------------------------------------------------------------- distances

def ref_pdist(embeddings):
    """Squared Euclidean distances of the rows of `embeddings` (B, D), as a (B, B) list of floats.

    Computed directly as sum_k (x_k - y_k)^2 in Python floats (float64).
    """
    rows = _to_list(embeddings)
    size = len(rows)
    distances = [[0.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(size):
            if i == j:
                continue
            total = 0.0
            for x, y in zip(rows[i], rows[j]):
                total += (float(x) - float(y)) ** 2
            distances[i][j] = total
    return distances


# ----------------------------------------------------------------------------- pairs

def ref_all_positive_pairs(labels):
    """Every unordered pair (i, j), i < j, with equal labels, in lexicographic order."""
    labels = _to_list(labels)
    pairs = []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            if labels[i] == labels[j]:
                pairs.append((i, j))
    return pairs


def ref_all_negative_pairs(labels):
    """Every unordered pair (i, j), i < j, with different labels, in lexicographic order."""
    labels = _to_list(labels)
    pairs = []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            if labels[i] != labels[j]:
                pairs.append((i, j))
    return pairs


def ref_hard_negative_pairs(D, labels):
    """The k = min(P, N_all) negative pairs with the smallest D[i][j], ties by (i, j).

    Returned in lexicographic (i, j) order; P counts the positive pairs.
    """
    rows, _ = _distance_rows(D)
    number_of_positives = len(ref_all_positive_pairs(labels))
    negatives = ref_all_negative_pairs(labels)
    keyed = [(rows[i][j], i, j) for (i, j) in negatives]
    keyed.sort()
    k = min(number_of_positives, len(negatives))
    return sorted((i, j) for (_, i, j) in keyed[:k])


# ----------------------------------------------------------------------------- triplets

def ref_all_triplets(labels):
    """Every (a, p, n): a != p same label, n of another label, in lexicographic order."""
    labels = _to_list(labels)
    triplets = []
    for a in range(len(labels)):
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a]:
                continue
            for n in range(len(labels)):
                if labels[n] != labels[a]:
                    triplets.append((a, p, n))
    return triplets


def ref_threshold(rows, a, p, margin, scalar_type):
    """D[a][p] + margin, rounded in `scalar_type`: a negative n is hard when D[a][n] < this."""
    return rows[a][p] + scalar_type(margin)


def ref_hardest_negative_triplets(D, labels, margin):
    """For each ordered (a, p): a's closest negative (lowest index on ties), kept if it is hard."""
    rows, scalar_type = _distance_rows(D)
    triplets = []
    for a, p in ref_anchor_positive_pairs(labels):
        closest = None
        for n in ref_negatives_of(labels, a):
            if closest is None or rows[a][n] < rows[a][closest]:
                closest = n
        if closest is None:
            continue
        if rows[a][closest] < ref_threshold(rows, a, p, margin, scalar_type):
            triplets.append((a, p, closest))
    return triplets


def ref_random_hard_candidates(D, labels, margin):
    """Dict (a, p) -> negatives n with D[a][n] < D[a][p] + margin, for every ordered (a, p)."""
    rows, scalar_type = _distance_rows(D)
    candidates = {}
    for a, p in ref_anchor_positive_pairs(labels):
        threshold = ref_threshold(rows, a, p, margin, scalar_type)
        admissible = []
        for n in ref_negatives_of(labels, a):
            if rows[a][n] < threshold:
                admissible.append(n)
        candidates[(a, p)] = admissible
    return candidates


def ref_semihard_candidates(D, labels, margin):
    """Dict (a, p) -> negatives n with D[a][p] < D[a][n] < D[a][p] + margin, for every (a, p)."""
    rows, scalar_type = _distance_rows(D)
    candidates = {}
    for a, p in ref_anchor_positive_pairs(labels):
        threshold = ref_threshold(rows, a, p, margin, scalar_type)
        admissible = []
        for n in ref_negatives_of(labels, a):
            if rows[a][p] < rows[a][n] < threshold:
                admissible.append(n)
        candidates[(a, p)] = admissible
    return candidates


def ref_random_hard_triplets(D, labels, margin, rng):
    """One uniformly random hard negative per ordered (a, p) that has one; `rng` a random.Random."""
    return [(a, p, rng.choice(admissible))
            for (a, p), admissible in ref_random_hard_candidates(D, labels, margin).items()
            if admissible]


def ref_semihard_triplets(D, labels, margin, rng):
    """One uniformly random semi-hard negative per ordered (a, p) that has one."""
    return [(a, p, rng.choice(admissible))
            for (a, p), admissible in ref_semihard_candidates(D, labels, margin).items()
            if admissible]


def ref_batch_hard_triplets(D, labels):
    """For each anchor with a positive and a negative: (a, farthest positive, closest negative).

    First argmax / first argmin on ties; anchors ascending.
    """
    rows, _ = _distance_rows(D)
    labels = _to_list(labels)
    triplets = []
    for a in range(len(labels)):
        hardest_positive = None
        for p in range(len(labels)):
            if p != a and labels[p] == labels[a]:
                if hardest_positive is None or rows[a][p] > rows[a][hardest_positive]:
                    hardest_positive = p
        hardest_negative = None
        for n in range(len(labels)):
            if labels[n] != labels[a]:
                if hardest_negative is None or rows[a][n] < rows[a][hardest_negative]:
                    hardest_negative = n
        if hardest_positive is not None and hardest_negative is not None:
            triplets.append((a, hardest_positive, hardest_negative))
    return triplets


def ref_balanced_pairs(labels, rng):
    """(all positive pairs, a random subset of min(P, N_all) negative pairs) using `rng`."""
    positives = ref_all_positive_pairs(labels)
    negatives = ref_all_negative_pairs(labels)
    return positives, rng.sample(negatives, min(len(positives), len(negatives)))


# ----------------------------------------------------------------------------- losses

def _squared_distance(x, y):
    total = 0.0
    for xk, yk in zip(x, y):
        total += (float(xk) - float(yk)) ** 2
    return total


def ref_contrastive_loss(output1, output2, target, margin, size_average=True):
    """0.5 * (t d + (1 - t) relu(margin - sqrt(d + 1e-9))^2) per row, mean or sum."""
    output1, output2, target = _to_list(output1), _to_list(output2), _to_list(target)
    losses = []
    for x, y, t in zip(output1, output2, target):
        d = _squared_distance(x, y)
        hinge = max(0.0, margin - math.sqrt(d + 1e-9))
        losses.append(0.5 * (float(t) * d + (1.0 - float(t)) * hinge ** 2))
    return sum(losses) / len(losses) if size_average else sum(losses)


def ref_triplet_loss(anchor, positive, negative, margin, size_average=True):
    """relu(|a - p|^2 - |a - n|^2 + margin) per row, mean or sum."""
    anchor, positive, negative = _to_list(anchor), _to_list(positive), _to_list(negative)
    losses = []
    for a, p, n in zip(anchor, positive, negative):
        losses.append(max(0.0, _squared_distance(a, p) - _squared_distance(a, n) + margin))
    return sum(losses) / len(losses) if size_average else sum(losses)


def ref_online_contrastive_loss(embeddings, positive_pairs, negative_pairs, margin):
    """Mean over [d(pos pairs)] + [relu(margin - sqrt(d + 1e-9))^2 (neg pairs)]; 0.0 if empty."""
    rows = _to_list(embeddings)
    terms = []
    for i, j in _to_list(positive_pairs):
        terms.append(_squared_distance(rows[i], rows[j]))
    for i, j in _to_list(negative_pairs):
        d = _squared_distance(rows[i], rows[j])
        terms.append(max(0.0, margin - math.sqrt(d + 1e-9)) ** 2)
    return sum(terms) / len(terms) if terms else 0.0


def ref_online_triplet_loss(embeddings, triplets, margin):
    """(mean of relu((D[a,p] + margin) - D[a,n]) over triplets, count of non-zero terms).

    Computed in float64 from the embeddings; (0.0, 0) for no triplets.
    """
    rows = _to_list(embeddings)
    losses = []
    for a, p, n in _to_list(triplets):
        value = (_squared_distance(rows[a], rows[p]) + margin) - _squared_distance(rows[a], rows[n])
        losses.append(max(0.0, value))
    if not losses:
        return 0.0, 0
    return sum(losses) / len(losses), sum(1 for loss in losses if loss > 0)


def ref_nonzero_triplet_count(D, triplets, margin):
    """How many triplets are hard, D[a][n] < D[a][p] + margin, rounded in D's dtype."""
    rows, scalar_type = _distance_rows(D)
    return sum(1 for a, p, n in _to_list(triplets)
               if rows[a][n] < ref_threshold(rows, a, p, margin, scalar_type))


# ----------------------------------------------------------------------------- classic style
# Benchmark only: per-(anchor, positive) Python loop, numpy over the negatives.

def _classic_style(D, labels, margin, choose_negative):
    distances = np.asarray(D)
    labels = np.asarray(labels)
    triplets = []
    for anchor in range(len(labels)):
        same_label = labels == labels[anchor]
        negatives = np.where(~same_label)[0]
        if len(negatives) == 0:
            continue
        for positive in np.where(same_label)[0]:
            if positive == anchor:
                continue
            chosen = choose_negative(distances[anchor, positive], distances[anchor, negatives])
            if chosen is not None:
                triplets.append((anchor, int(positive), int(negatives[chosen])))
    return np.array(triplets, dtype=np.int64).reshape(-1, 3)


def classic_style_hardest(D, labels, margin):
    """Classic-shaped hardest-negative selection on a numpy distance matrix D (B, B)."""
    def choose(positive_distance, negative_distances):
        closest = int(np.argmin(negative_distances))
        return closest if negative_distances[closest] < positive_distance + margin else None
    return _classic_style(D, labels, margin, choose)


def classic_style_random_hard(D, labels, margin, rng):
    """Classic-shaped random-hard selection; `rng` is a numpy Generator."""
    def choose(positive_distance, negative_distances):
        hard = np.where(negative_distances < positive_distance + margin)[0]
        return int(rng.choice(hard)) if len(hard) else None
    return _classic_style(D, labels, margin, choose)


def classic_style_semihard(D, labels, margin, rng):
    """Classic-shaped semi-hard selection; `rng` is a numpy Generator."""
    def choose(positive_distance, negative_distances):
        semihard = np.where((negative_distances > positive_distance)
                            & (negative_distances < positive_distance + margin))[0]
        return int(rng.choice(semihard)) if len(semihard) else None
    return _classic_style(D, labels, margin, choose)



# ----------------------------------------------------------------------------- distance and margin variants


def ref_distance(x, y, distance):
    """|x - y|^2 ("squared") or |x - y| ("euclidean"), in float64 from the coordinates."""
    squared = _squared_distance(x, y)
    return squared if distance == "squared" else math.sqrt(squared)


def ref_triplet_term(d_ap, d_an, margin, soft):
    """relu(d_ap + margin - d_an), or log(1 + exp(d_ap + margin - d_an)) with `soft`."""
    excess = d_ap + margin - d_an
    if not soft:
        return max(0.0, excess)
    return excess + math.log1p(math.exp(-excess)) if excess > 0 else math.log1p(math.exp(excess))


def ref_triplet_losses(embeddings, triplets, margin, soft, distance):
    """The per-triplet terms of `triplets` (rows (a, p, n) into `embeddings`)."""
    rows = _to_list(embeddings)
    return [ref_triplet_term(ref_distance(rows[a], rows[p], distance), ref_distance(rows[a], rows[n], distance),
                             margin, soft) for a, p, n in _to_list(triplets)]


def ref_contrastive_term(x, y, target, margin, distance):
    """t d + (1 - t) relu(margin - sqrt(d + 1e-9))^2 for the squared distance d ("squared"), or
    t D + (1 - t) relu(margin - D) for the plain distance D ("euclidean")."""
    squared = _squared_distance(x, y)
    if distance == "squared":
        return float(target) * squared + (1.0 - float(target)) * max(0.0, margin - math.sqrt(squared + 1e-9)) ** 2
    plain = math.sqrt(squared)
    return float(target) * plain + (1.0 - float(target)) * max(0.0, margin - plain)


# ----------------------------------------------------------------------------- multi-similarity

def ref_multi_similarity_pairs(S, labels, epsilon):
    """Wang et al.'s mining (CVPR 2019, eqs. 6-7), loop by loop: for each anchor a, the lists of kept
    positive and negative columns of the similarity rows S (A x N) (anchor a's row is S[a]; ``labels`` of
    the N items, the anchors being items 0 .. A - 1). epsilon None keeps every pair."""
    S, labels = _to_list(S), _to_list(labels)
    kept = []
    for a, row in enumerate(S):
        positives = [j for j in range(len(labels)) if labels[j] == labels[a] and j != a]
        negatives = [j for j in range(len(labels)) if labels[j] != labels[a]]
        if epsilon is not None:
            least_positive = min((row[j] for j in positives), default=math.inf)
            most_negative = max((row[j] for j in negatives), default=-math.inf)
            positives, negatives = ([j for j in positives if row[j] - epsilon < most_negative],
                                    [j for j in negatives if row[j] + epsilon > least_positive])
        kept.append((positives, negatives))
    return kept


def ref_multi_similarity_loss(embeddings, labels, alpha, beta, base, epsilon, n_anchors=None):
    """The multi-similarity loss (Wang et al., eq. 4) of float64 Python loops: cosine similarities of the
    L2-normalised embeddings, the mined pairs, then the mean over every anchor (the first n_anchors items;
    None: all) of log(1 + sum_P exp(-alpha (S - base))) / alpha + log(1 + sum_N exp(beta (S - base))) / beta."""
    vectors = [[float(x) for x in row] for row in _to_list(embeddings)]
    units = []
    for row in vectors:
        norm = math.sqrt(sum(x * x for x in row))
        units.append([x / max(norm, 1e-12) for x in row])
    S = [[sum(x * y for x, y in zip(u, v)) for v in units] for u in units]
    n_anchors = len(vectors) if n_anchors is None else n_anchors
    total = 0.0
    for a, (positives, negatives) in enumerate(ref_multi_similarity_pairs(S[:n_anchors], labels, epsilon)):
        total += math.log(1 + sum(math.exp(-alpha * (S[a][j] - base)) for j in positives)) / alpha
        total += math.log(1 + sum(math.exp(beta * (S[a][j] - base)) for j in negatives)) / beta
    return total / n_anchors


# ----------------------------------------------------------------------------- open-set calibration

def ref_precision_recall_curve(distances, nearest_labels, true_labels, gallery_classes):
    """open_set.precision_recall_curve from its definition: for each distinct distance t, ascending, loop over
    the queries and count those accepted (distance <= t), those accepted and right (nearest label == true
    label) and those of a class the gallery holds. Returns a list of (t, precision, recall)."""
    distances = [float(value) for value in _to_list(distances)]
    held = set(gallery_classes)
    n_known = sum(1 for label in true_labels if label in held)
    rows = []
    for threshold in sorted(set(distances)):
        accepted = correct = 0
        for distance, nearest, true in zip(distances, nearest_labels, true_labels):
            if distance <= threshold:
                accepted += 1
                if nearest == true:
                    correct += 1
        rows.append((threshold, correct / accepted, correct / n_known))
    return rows


# ----------------------------------------------------------------------------- nearest neighbours

def ref_nearest_neighbours(queries, gallery, k):
    """The k nearest gallery rows of each query by a loop: (distances, indices) as lists of Q lists of k,
    Euclidean in float64, ascending, equal distances by the lower index."""
    queries, gallery = np.asarray(queries, dtype=np.float64), np.asarray(gallery, dtype=np.float64)
    distances, indices = [], []
    for query in queries:
        row = sorted((math.sqrt(sum((q - g) ** 2 for q, g in zip(query, item))), index)
                     for index, item in enumerate(gallery))[:k]
        distances.append([distance for distance, _ in row])
        indices.append([index for _, index in row])
    return distances, indices
