"""A cross-batch memory (Wang, Zhang, Huang and Scott, "Cross-Batch Memory for Embedding Learning", CVPR
2020): a first-in first-out queue of the last ``size`` embeddings and labels seen in training, detached,
which the online losses mine as extra candidates (positives and negatives, never anchors).

Its idea: embeddings drift slowly once training settles, so the embeddings of the last few thousand images
are nearly what the model gives them now, and a batch's anchors can be mined against them (a ``(B, B + M)``
block instead of ``(B, B)``) for the cost of their memory, without computing them again. A loss built
with ``memory=CrossBatchMemory(...)`` (``losses.OnlineContrastiveLoss``, ``OnlineTripletLoss``,
``MultiSimilarityLoss``) does, in each training step (autograd on): take the batch and the memory's items as
candidates (``candidates``; the memory only once ``warmup`` steps have been seen, as the paper starts it
after the model's early fast drift), mine the batch's rows, then ``push`` the batch. Outside training steps
(validation under ``torch.no_grad``) the memory is neither used nor changed.

Its state (the queue, how full it is, where the next item goes, the steps seen) is made of buffers, so it is
in the loss's ``state_dict`` and ``trainer.fit``'s checkpoints: a resumed run mines against the memory the
uninterrupted run had. Under several processes the losses push the gathered global batch, so every rank
holds the same memory and mines what one process mines.
"""

import torch
from torch import nn

from utils import check_int


class CrossBatchMemory(nn.Module):
    """A FIFO queue of at most ``size`` embeddings ``(size, embedding_dim)`` float32 and their labels.

    ``warmup``: the number of training steps pushed before the memory is used as candidates (0: from the
    second step on, the first having nothing to remember). The queue lives on the device of the embeddings
    pushed into it (moved on the first push from elsewhere).
    """

    def __init__(self, size, embedding_dim, warmup=0):
        super().__init__()
        self.size = check_int(size, "size", 1)
        self.embedding_dim = check_int(embedding_dim, "embedding_dim", 1)
        self.warmup = check_int(warmup, "warmup", 0)
        self.register_buffer("embeddings", torch.zeros(self.size, self.embedding_dim))
        self.register_buffer("labels", torch.zeros(self.size, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # items held (<= size)
        self.register_buffer("position", torch.zeros((), dtype=torch.long))  # where the next item goes
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # batches pushed

    def extra_repr(self):
        return f"size={self.size}, embedding_dim={self.embedding_dim}, warmup={self.warmup}"

    def active(self):
        """Whether a training step now mines against the memory: warm-up over and something held."""
        return int(self.steps) >= self.warmup and int(self.filled) > 0

    def candidates(self, embeddings, labels):
        """The batch ``embeddings (N, D)``, ``labels (N,)`` followed by the memory's items when ``active()``:
        ``(N + M, D)`` in the embeddings' dtype, ``(N + M,)``, the memory's ``M`` in slot order (slot order
        is a function of the pushes, so equal on every process). The memory part carries no gradient."""
        self._check(embeddings, labels)
        if not self.active():
            return embeddings, labels
        held = int(self.filled)
        remembered = self.embeddings[:held].to(device=embeddings.device, dtype=embeddings.dtype)
        return (torch.cat([embeddings, remembered]),
                torch.cat([labels, self.labels[:held].to(labels.device)]))

    @torch.no_grad()
    def push(self, embeddings, labels):
        """Enqueue a batch ``embeddings (N, D)``, ``labels (N,)`` (detached, as float32), dropping the oldest
        items beyond ``size`` (a batch larger than the queue leaves its last ``size`` items), and count a
        step."""
        self._check(embeddings, labels)
        if self.embeddings.device != embeddings.device:  # the counters may stay where they are: read as ints
            self.embeddings = self.embeddings.to(embeddings.device)
            self.labels = self.labels.to(embeddings.device)
        embeddings, labels = embeddings.detach()[-self.size:], labels[-self.size:]
        position, count = int(self.position), len(labels)
        slots = (position + torch.arange(count, device=labels.device)) % self.size
        self.embeddings[slots] = embeddings.float()
        self.labels[slots] = labels.long()
        self.position.fill_((position + count) % self.size)
        self.filled.fill_(min(int(self.filled) + count, self.size))
        self.steps.add_(1)

    def _check(self, embeddings, labels):
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"the memory holds {self.embedding_dim}-dimensional embeddings, got shape "
                             f"{tuple(embeddings.shape)}; build CrossBatchMemory with the model's embedding size")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must have shape ({len(embeddings)},), got {tuple(labels.shape)}")
