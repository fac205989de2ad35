"""Counter-based random numbers: the same draw for the same key and counters, on any device and any
number of processes.

A random selector that mines only the anchors one process owns cannot share one generator's sequence
with the other processes: the k-th number it draws would depend on how many anchors came before it on
its own rank. Here a draw is a pure function of a key (one number per call, taken from the selector's
``torch.Generator``) and of counters such as the global anchor index and the slot of a positive, so
anchor 1234 gets the same numbers whichever process mines it and however the batch is split.

The function is a 32-bit integer hash applied counter after counter (xor, then an avalanche of shifts
and multiplications, each multiplier below 2^31 so that every product of two 32-bit values fits in
int64 without overflow), computed with torch integer operations on the counters' device: no Python
loop, no host transfer. Its numbers are for sampling, not for cryptography.
"""

import numpy as np
import torch

_MASK = 0xFFFFFFFF
# Two multipliers of a well-mixing 32-bit xorshift-multiply hash (bias about 0.1 of the ideal avalanche),
# both odd and below 2^31.
_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
KEY_RANGE = 1 << 32  # keys are ints in [0, 2^32)


def _avalanche(values):
    """Each int64 value in [0, 2^32) mixed into another in [0, 2^32), a bijection of that range."""
    values = values ^ (values >> 16)
    values = (values * _MULTIPLIERS[0]) & _MASK
    values = values ^ (values >> 15)
    values = (values * _MULTIPLIERS[1]) & _MASK
    return values ^ (values >> 15)


def hashed(key, *counters):
    """The hash of ``key`` (an int or 0-d int tensor in [0, 2^32)) and the ``counters`` (int64 tensors or
    ints, broadcast together, each value in [0, 2^32)): int64 values in [0, 2^32) of the broadcast shape,
    on the counters' device."""
    return torch.as_tensor(_hash(key, counters))


def _hash(key, counters, on_host=None):
    """``hashed``'s values, computed with numpy when ``on_host`` (default: when the counters are on the CPU,
    where numpy's integer operations cost a fraction of torch's per call on the few thousand numbers a
    selection draws) and returned as a numpy array, else with torch on the counters' device. The same
    values either way (the operations are exact integer ones)."""
    tensors = [counter for counter in counters if isinstance(counter, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    if on_host is None:
        on_host = device.type == "cpu"
    if on_host:
        def as_array(value):
            return np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value, dtype=np.int64)
    else:
        def as_array(value):
            return torch.as_tensor(value, dtype=torch.long, device=device)
    state = _avalanche(as_array(key) & _MASK)
    for counter in counters:
        state = _avalanche(state ^ (as_array(counter) & _MASK))
    return state


def uniform(key, *counters):
    """Uniform numbers in [0, 1) as float64, one for each broadcast element of the ``counters`` (see
    ``hashed``), with 53 random bits: two hashes (the second with one more counter) joined."""
    return _uniform_of(_hash(key, counters))


def _uniform_of(high):
    """``uniform``'s numbers from the first hash ``high`` (a numpy array or a tensor), as a float64 tensor."""
    low = _avalanche(high ^ 0x5BD1E995)  # a second, independent word from the first
    bits = (high << 21) | (low >> 11)
    if isinstance(bits, torch.Tensor):
        return bits.double() * (1.0 / (1 << 53))
    return torch.as_tensor(np.asarray(bits, dtype=np.float64) * (1.0 / (1 << 53)))


def draw_key(generator=None):
    """One key in [0, 2^32), a 0-d int64 tensor on the generator's device (no host transfer), drawn from
    ``generator`` (a torch.Generator) or from torch's global generator (on the CPU): the call's seed for
    ``uniform`` and ``hashed``. Generators seeded alike on every process draw the same key."""
    if generator is None:
        return torch.randint(KEY_RANGE, (), dtype=torch.long)
    return torch.randint(KEY_RANGE, (), dtype=torch.long, generator=generator, device=generator.device)


class AnchorStreams:
    """The random numbers of one selection call, a stream per anchor keyed by (the call's key, the
    anchor's global index): ``integers(count)`` gives ``(A, count)`` ints in [0, 2^32), row ``i`` being
    anchor ``anchors[i]``'s first ``count`` numbers, the same whichever process draws them (one avalanche
    per number: the anchor's state is hashed once). This is what the random negative-selection functions
    (``utils.random_hard_negative``, ``utils.semihard_negative``) receive as their ``generator``."""

    def __init__(self, key, anchors):
        self._key, self.anchors = key, anchors
        self._states = None

    @property
    def key(self):
        """The call's key; a callable given instead (e.g. ``draw_key`` of torch's global generator) is
        called at the first use, so that a selection that draws nothing consumes nothing."""
        if callable(self._key):
            self._key = self._key()
        return self._key

    def part(self, rows):
        """The streams of the anchors ``rows`` (a slice of ``anchors``), sharing this call's key."""
        return AnchorStreams(lambda: self.key, self.anchors[rows])

    def integers(self, count):
        """``(A, count)``: every anchor's numbers 0 .. count - 1."""
        return self.integers_at(torch.arange(len(self.anchors), device=self.anchors.device)[:, None],
                                torch.arange(count, device=self.anchors.device))

    def integers_at(self, rows, counters):
        """The numbers ``counters`` of the anchors at positions ``rows`` (broadcast together): the same as
        the matching entries of ``integers``, for a caller that needs only some."""
        if self._states is None:
            self._states = hashed(self.key, self.anchors)
        return _avalanche(self._states[rows] ^ counters)
