"""Held-out classes: train on some classes only (``--train-classes 0-4``) and measure the embedding on
classes it never saw: one-shot accuracy in N-way 1-shot episodes, verification ROC-AUC and retrieval
MAP@R (``evaluate_held_out``), beside the pixels as a no-learning reference (``PixelEmbedding``). The study's
runner (``experiments.py``) trains, scores and records these rows.
"""

from torch import nn
from torch.utils.data import DataLoader

from datasets import class_subset
from methods import EVALUATION_BATCH, data_workers
from episodes import few_shot_accuracy
from metrics import extract_embeddings, retrieval_metrics, verification_roc_auc

HELD_OUT_EPISODES = 1000
HELD_OUT_COLUMNS = [("train_classes", "train classes", "{}"),
                    ("held_out_one_shot", "held-out 1-shot acc", "{:.3f}"),
                    ("held_out_one_shot_ci95", "+-", "{:.3f}"),
                    ("held_out_roc_auc", "held-out ROC-AUC", "{:.3f}"),
                    ("held_out_map_at_r", "held-out MAP@R", "{:.3f}")]


def parse_classes(spec, n_classes):
    """Sorted class ids from ``spec``: a list of ints, or a string of ids and ranges such as ``'0-4'``,
    ``'0,1,2,3,4'`` or ``'0-2,7'``. Each must be in [0, n_classes); at least one class and at least two
    others (for the held-out episodes) must remain."""
    if isinstance(spec, str):
        ids = []
        for part in filter(None, (piece.strip() for piece in spec.split(","))):
            first, dash, last = part.partition("-")
            if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
                raise ValueError(f"cannot read train classes {spec!r}: use ids and ranges such as '0-4' or '0,1,2,3,4'")
            ids += range(int(first), int(last) + 1) if dash else [int(first)]
    else:
        ids = [int(class_id) for class_id in spec]
    ids = sorted(set(ids))
    if not ids or ids[0] < 0 or ids[-1] >= n_classes:
        raise ValueError(f"train classes must be ids in 0..{n_classes - 1}, got {spec!r}")
    if n_classes - len(ids) < 2:
        raise ValueError(f"train classes {spec!r} leave {n_classes - len(ids)} held-out classes; leave at least 2")
    return ids


def held_out_splits(train_set, test_set, train_classes):
    """``((seen train, seen test), held-out test, tag)`` for training on ``train_classes`` only (see
    parse_classes); ``tag`` names the class set in file names, e.g. '0-4'."""
    seen = parse_classes(train_classes, len(train_set.classes))
    unseen = [k for k in range(len(train_set.classes)) if k not in seen]
    tag = ",".join(str(k) for k in seen) if seen != list(range(seen[0], seen[-1] + 1)) else f"{seen[0]}-{seen[-1]}"
    return ((class_subset(train_set, seen), class_subset(test_set, seen)), class_subset(test_set, unseen), tag)


class PixelEmbedding(nn.Module):
    """The no-learning reference embedding: images ``(B, C, H, W)`` -> their pixels ``(B, C*H*W)``."""

    def forward(self, x):
        return x.flatten(1)

    def get_embedding(self, x):
        return self(x)


HELD_OUT_BASELINES = ("pixels", "untrained network")


def evaluate_held_out(model, held_out, seed=0, n_episodes=HELD_OUT_EPISODES):
    """One-shot accuracy (5-way 1-shot, or fewer ways when fewer classes are held out; 1 query per class,
    seeded episodes) with its 95% interval, verification ROC-AUC and retrieval MAP@R (each image querying
    the others), on held-out classes never trained on. Returns {'held_out_one_shot',
    'held_out_one_shot_ci95', 'held_out_n_way', 'held_out_roc_auc', 'held_out_map_at_r'}."""
    embeddings, labels = extract_embeddings(
        DataLoader(held_out, batch_size=EVALUATION_BATCH, num_workers=data_workers(held_out)), model)
    n_way = min(5, len(held_out.classes))
    episodes = few_shot_accuracy(embeddings, labels, n_way, 1, n_episodes, seed=seed)
    return {"held_out_one_shot": episodes["accuracy"], "held_out_one_shot_ci95": episodes["ci95"],
            "held_out_n_way": n_way, "held_out_roc_auc": verification_roc_auc(embeddings, labels, seed=seed),
            "held_out_map_at_r": retrieval_metrics(embeddings, labels)["map_at_r"]}
