"""N-way K-shot episodes: how well an embedding recognises classes from K examples of each.

`sample_episodes` draws seeded episodes (N classes, K support and some query items each, optionally all
classes of an episode inside one group such as an Omniglot alphabet), `episode_accuracies` scores them
with the prototype or the nearest-neighbour rule, `few_shot_accuracy` gives the mean accuracy with a 95%
confidence interval for embeddings `(N, D)` with labels `(N,)`, and `n_way_k_shot_accuracy` does the same
for a model on a dataset. Every episode is index operations on embeddings computed once, batched over
episodes. Omniglot's protocols and Lake et al.'s 20 runs are in omniglot.py; held-out classes of the
study in held_out.py.
"""

import torch
from torch.utils.data import DataLoader

from distances import squared_distances
from metrics import _check_embeddings_and_labels, extract_embeddings
from utils import check_choice, check_int, groups_of_classes


def sample_episodes(labels, n_way, k_shot, n_query, n_episodes, groups=None, seed=0):
    """Item indices of seeded N-way K-shot episodes.

    Takes labels (N,) integers (one class per item) and optionally groups (N,) integers (e.g. the
    alphabet of each Omniglot character; constant within a class). An episode draws n_way distinct
    classes uniformly among the classes with at least k_shot + n_query items (with groups: first a
    group, uniformly among the groups having n_way such classes, then the classes inside it), then
    k_shot + n_query distinct items of each class uniformly: the first k_shot are the support, the
    others the queries, so the two never overlap. Draws come from torch.Generator().manual_seed(seed)
    on the CPU, in chunks of episodes so memory stays bounded for classes of thousands of items.
    Returns (support (E, n_way, k_shot), query (E, n_way, n_query)) long tensors of item indices, row
    w of an episode holding its w-th class.
    """
    labels = torch.as_tensor(labels).cpu()
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise TypeError("labels must be a 1-D integer tensor (N,)")
    check_int(n_way, "n_way", 2)
    check_int(k_shot, "k_shot", 1)
    check_int(n_query, "n_query", 1)
    check_int(n_episodes, "n_episodes", 1)
    check_int(seed, "seed", 0)
    per_class = k_shot + n_query
    classes, class_of, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    eligible = counts >= per_class
    if groups is None:
        class_groups = torch.zeros(len(classes), dtype=torch.long)
    else:
        class_groups = groups_of_classes(class_of, len(classes), groups)
    n_groups = int(class_groups.max()) + 1
    eligible_per_group = torch.zeros(n_groups, dtype=torch.long).index_add_(0, class_groups, eligible.long())
    usable_groups = (eligible_per_group >= n_way).nonzero().squeeze(1)
    if usable_groups.numel() == 0:
        where = "in any group" if groups is not None else "in the data"
        raise ValueError(f"{n_way}-way episodes need {n_way} classes with >= {per_class} items (k_shot + "
                         f"n_query) {where}; there are at most {int(eligible_per_group.max())}")
    # members[c] lists class c's items, padded with -1, so item draws are one masked top-k
    order = torch.argsort(class_of, stable=True)
    starts = counts.cumsum(0) - counts
    width = int(counts.max())
    members = torch.full((len(classes), width), -1, dtype=torch.long)
    position = torch.arange(len(labels)) - starts[class_of[order]]
    members[class_of[order], position] = order

    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, (1 << 22) // max(n_way * width, len(classes)))
    supports, queries = [], []
    for start in range(0, n_episodes, chunk):
        size = min(chunk, n_episodes - start)
        episode_groups = usable_groups[torch.randint(len(usable_groups), (size,), generator=generator)]
        class_keys = torch.rand(size, len(classes), generator=generator)
        allowed = eligible[None, :] & (class_groups[None, :] == episode_groups[:, None])
        class_keys = torch.where(allowed, class_keys, 2.0)  # never among the n_way smallest
        chosen = torch.topk(class_keys, n_way, dim=1, largest=False).indices  # (size, n_way), random order
        item_keys = torch.rand(size, n_way, width, generator=generator)
        rows = members[chosen]  # (size, n_way, width)
        item_keys = torch.where(rows >= 0, item_keys, 2.0)
        picked = torch.topk(item_keys, per_class, dim=2, largest=False).indices
        items = rows.gather(2, picked)
        supports.append(items[:, :, :k_shot])
        queries.append(items[:, :, k_shot:])
    return torch.cat(supports), torch.cat(queries)


def _episode_distances(queries, references):
    """Squared distances (E, Q, R) between queries (E, Q, D) and references (E, R, D): the batched
    form of distances.squared_distances."""
    return squared_distances(queries, references)


def episode_accuracies(embeddings, support, query, rule="prototype"):
    """Accuracy of each episode given embeddings (N, D) and episode indices support (E, W, K) and
    query (E, W, Q) (as sample_episodes returns them: row w is class w).

    rule 'prototype': a query gets the class whose mean support embedding is nearest (Snell et al.,
    2017); 'nearest': the class of its nearest support embedding. Euclidean distance; equal
    distances go to the lower class row. Returns (E,) float accuracies in [0, 1] on the embeddings'
    device.
    """
    check_choice(rule, ("prototype", "nearest"), "rule")
    if support.dim() != 3 or query.dim() != 3 or support.shape[:2] != query.shape[:2]:
        raise ValueError(f"support (E, W, K) and query (E, W, Q) must share E and W, got "
                         f"{tuple(support.shape)} and {tuple(query.shape)}")
    n_episodes, n_way, k_shot = support.shape
    n_query = query.shape[2]
    device = embeddings.device
    truth = torch.arange(n_way, device=device).repeat_interleave(n_query)
    accuracies = []
    chunk = max(1, (1 << 22) // (n_way * max(k_shot, n_query) * embeddings.shape[1]))
    for start in range(0, n_episodes, chunk):
        support_embeddings = embeddings[support[start:start + chunk].to(device)]  # (e, W, K, D)
        query_embeddings = embeddings[query[start:start + chunk].to(device)].flatten(1, 2)  # (e, W*Q, D)
        if rule == "prototype":
            predicted = _episode_distances(query_embeddings, support_embeddings.mean(2)).argmin(2)
        else:
            nearest = _episode_distances(query_embeddings, support_embeddings.flatten(1, 2)).argmin(2)
            predicted = torch.div(nearest, k_shot, rounding_mode="floor")
        accuracies.append((predicted == truth).float().mean(1))
    return torch.cat(accuracies)


def few_shot_accuracy(embeddings, labels, n_way=5, k_shot=1, n_episodes=1000, groups=None, seed=0, n_query=1,
                      rule="prototype"):
    """Mean N-way K-shot accuracy of an embedding over seeded episodes, with a 95% confidence interval.

    Takes embeddings (N, D) and labels (N,) (and groups (N,) for episodes inside one group, e.g. one
    alphabet); episodes as in sample_episodes, scored as in episode_accuracies.
    Returns {'accuracy', 'ci95' (1.96 standard errors of the episode mean, NaN for one episode),
    'n_episodes', 'n_way', 'k_shot', 'n_query', 'rule'}.
    """
    labels = _check_embeddings_and_labels(embeddings, labels, "")
    support, query = sample_episodes(labels, n_way, k_shot, n_query, n_episodes, groups, seed)
    accuracies = episode_accuracies(embeddings.detach(), support, query, rule).double()
    ci95 = 1.96 * accuracies.std() / n_episodes ** 0.5 if n_episodes > 1 else torch.tensor(float("nan"))
    return {"accuracy": float(accuracies.mean()), "ci95": float(ci95), "n_episodes": n_episodes,
            "n_way": n_way, "k_shot": k_shot, "n_query": n_query, "rule": rule}


def n_way_k_shot_accuracy(model, dataset, n_way=5, k_shot=1, n_episodes=1000, groups=None, seed=0, n_query=1,
                          rule="prototype", batch_size=512, device=None):
    """N-way K-shot accuracy of `model` on the classes of `dataset` (pass classes it never saw).

    Every image of the dataset (items (image, label), e.g. an InMemoryDataset without augmentation) is
    embedded once with model.get_embedding; each episode is then index operations on those embeddings
    (see few_shot_accuracy, which takes the other arguments). groups (N,): one group id per item, to
    draw each episode's classes inside one group (e.g. one Omniglot alphabet, `dataset.alphabets`);
    groups with fewer than n_way usable classes are skipped. None: classes from the whole dataset.
    Returns {'accuracy', 'ci95', 'n_episodes', 'n_way', 'k_shot', 'n_query', 'rule'}.
    """
    embeddings, labels = extract_embeddings(DataLoader(dataset, batch_size=batch_size), model, device)
    return few_shot_accuracy(embeddings, labels, n_way, k_shot, n_episodes, groups, seed, n_query, rule)
