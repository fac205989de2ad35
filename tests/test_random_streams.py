"""Tests for random_streams.py: the counter-based numbers are pure functions of (key, counters), spread
uniformly, and an anchor's stream is the same whichever anchors are drawn with it."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import random_streams
from random_streams import KEY_RANGE, AnchorStreams, draw_key, hashed, uniform


def test_a_hash_is_a_function_of_its_key_and_counters_alone():
    counters = torch.arange(1000)
    first, again = hashed(7, counters), hashed(7, counters.clone())
    assert torch.equal(first, again) and first.dtype == torch.long
    assert int(first.min()) >= 0 and int(first.max()) < KEY_RANGE
    assert (hashed(8, counters) != first).float().mean() > 0.99  # another key, other numbers
    assert torch.equal(hashed(7, counters[500:]), first[500:])  # the same counter, the same number
    assert torch.equal(hashed(torch.tensor(7), counters), first)  # an int or a 0-d tensor key alike
    grid = hashed(3, torch.arange(4)[:, None], torch.arange(5))  # counters broadcast
    assert grid.shape == (4, 5) and len(set(grid.flatten().tolist())) == 20


def test_the_numbers_are_pinned_so_that_committed_selections_stay_reproducible():
    assert hashed(7, torch.arange(3)).tolist() == [256695110, 2346916401, 3632161615]
    assert uniform(7, torch.arange(3)).tolist() == [0.059766487690346426, 0.5464340563826058, 0.845678526731729]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, KEY_RANGE - 1), st.lists(st.integers(0, KEY_RANGE - 1), min_size=0, max_size=6),
       st.integers(0, KEY_RANGE - 1), st.booleans())
def test_numpy_and_torch_compute_the_same_numbers(key, first, second, key_as_tensor):
    """On the CPU the numbers are computed with numpy, elsewhere with torch: both ways, the same values."""
    key = torch.tensor(key) if key_as_tensor else key
    for counters in ((torch.tensor(first, dtype=torch.long),), (torch.tensor(first, dtype=torch.long)[:, None],
                                                                 torch.arange(3)), (second,), ()):
        host = random_streams._hash(key, counters, on_host=True)
        device = random_streams._hash(key, counters, on_host=False)
        assert isinstance(device, torch.Tensor) and torch.equal(torch.as_tensor(host), device)
        assert torch.equal(random_streams._uniform_of(host), random_streams._uniform_of(device))
        assert random_streams._uniform_of(host).dtype == torch.float64


def test_the_avalanche_is_a_bijection_of_32_bit_values():
    values = torch.arange(1 << 16) * 65_537  # spread over the 32-bit range
    mixed = random_streams._avalanche(values & 0xFFFFFFFF)
    assert len(torch.unique(mixed)) == len(values)
    assert int(mixed.max()) < KEY_RANGE and int(mixed.min()) >= 0


def test_uniform_numbers_fill_the_unit_interval_evenly():
    numbers = uniform(12345, torch.arange(200_000))
    assert numbers.dtype == torch.float64 and float(numbers.min()) >= 0 and float(numbers.max()) < 1
    counts = torch.histc(numbers, bins=20, min=0, max=1)
    expected = len(numbers) / 20
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert statistic < 19 + 10 * math.sqrt(2 * 19)  # chi-square, 19 degrees of freedom, a generous bound
    assert abs(float(numbers.mean()) - 0.5) < 0.005 and abs(float(numbers.var()) - 1 / 12) < 0.002
    # neighbouring counters are not correlated
    assert abs(float(torch.corrcoef(torch.stack([numbers[:-1], numbers[1:]]))[0, 1])) < 0.01


def test_an_anchor_draws_the_same_numbers_whichever_anchors_come_with_it():
    everyone = AnchorStreams(99, torch.arange(50)).integers(6)
    some = AnchorStreams(99, torch.arange(20, 35)).integers(6)
    assert torch.equal(some, everyone[20:35])
    assert torch.equal(AnchorStreams(99, torch.arange(50)).integers(3), everyone[:, :3])  # a prefix of the stream
    streams = AnchorStreams(99, torch.arange(50))
    rows, counters = torch.tensor([[3], [40]]), torch.tensor([1, 5])
    assert torch.equal(streams.integers_at(rows, counters), everyone[[3, 40]][:, [1, 5]])
    assert not torch.equal(AnchorStreams(100, torch.arange(50)).integers(6), everyone)


def test_a_callable_key_is_drawn_at_the_first_use_only():
    drawn = []

    def key():
        drawn.append(1)
        return 5

    streams = AnchorStreams(key, torch.arange(4))
    assert drawn == []
    first = streams.integers(2)
    streams.integers(2)
    assert drawn == [1] and torch.equal(first, AnchorStreams(5, torch.arange(4)).integers(2))


def test_a_key_comes_from_the_generator_or_the_global_seed():
    generator = torch.Generator().manual_seed(3)
    first, second = draw_key(generator), draw_key(generator)
    assert first.shape == () and first.dtype == torch.long and 0 <= int(first) < KEY_RANGE
    assert int(first) != int(second)  # the generator moved on by one draw
    replay = torch.Generator().manual_seed(3)
    assert int(draw_key(replay)) == int(first)
    torch.manual_seed(11)
    global_first = draw_key()
    torch.manual_seed(11)
    assert int(draw_key()) == int(global_first)


@pytest.mark.parametrize("counter", [-1, KEY_RANGE])
def test_counters_are_taken_modulo_two_to_the_32(counter):
    # documented range [0, 2^32): values outside wrap rather than overflow
    assert torch.equal(hashed(1, torch.tensor([counter])), hashed(1, torch.tensor([counter % KEY_RANGE])))
