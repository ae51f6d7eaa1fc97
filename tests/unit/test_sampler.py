"""ResumableSampler: epoch permutations, boundary crossing, exact resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.data.sampler import ResumableSampler

batch_sizes = st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=30)


@settings(max_examples=100, deadline=None)
@given(
    num_items=st.integers(min_value=1, max_value=40),
    sizes=batch_sizes,
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_each_epoch_is_a_permutation(num_items, sizes, seed):
    sampler = ResumableSampler(num_items, seed=seed)
    stream: list[int] = []
    while len(stream) < 3 * num_items:
        for size in sizes:
            stream.extend(sampler.next_batch(size))
    for epoch in range(3):
        chunk = stream[epoch * num_items : (epoch + 1) * num_items]
        assert sorted(chunk) == list(range(num_items))


@settings(max_examples=100, deadline=None)
@given(
    num_items=st.integers(min_value=1, max_value=40),
    before=batch_sizes,
    after=batch_sizes,
    seed=st.integers(min_value=0, max_value=1000),
)
def test_state_round_trip_continues_identically(num_items, before, after, seed):
    original = ResumableSampler(num_items, seed=seed)
    for size in before:
        original.next_batch(size)
    state = json.loads(json.dumps(original.state_dict()))
    resumed = ResumableSampler(num_items, seed=seed)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (original.epoch, original.position)
    for size in after:
        assert resumed.next_batch(size) == original.next_batch(size)


def test_crossing_epoch_boundary_continues_into_next_permutation():
    sampler = ResumableSampler(5, seed=3)
    epoch0 = sampler.next_batch(5)
    epoch1 = sampler.next_batch(5)
    assert sampler.epoch == 2 and sampler.position == 0
    fresh = ResumableSampler(5, seed=3)
    assert fresh.next_batch(3) == epoch0[:3]
    assert fresh.next_batch(3) == epoch0[3:] + epoch1[:1]
    assert (fresh.epoch, fresh.position) == (1, 1)


def test_permutation_depends_on_seed_and_epoch_not_global_rng():
    random.seed(1)
    np.random.seed(1)
    a = ResumableSampler(50, seed=7)
    first_a = [a.next_batch(50) for _ in range(3)]
    random.seed(2)
    np.random.seed(2)
    b = ResumableSampler(50, seed=7)
    assert [b.next_batch(50) for _ in range(3)] == first_a
    assert first_a[0] != first_a[1] != first_a[2]
    # (seed, epoch) = (0, 1) and (1, 0) must not coincide.
    s0 = ResumableSampler(50, seed=0)
    s0.next_batch(50)
    assert s0.next_batch(50) != ResumableSampler(50, seed=1).next_batch(50)


def test_no_shuffle_is_sequential():
    sampler = ResumableSampler(4, seed=0, shuffle=False)
    assert [sampler.next_batch(3) for _ in range(3)] == [
        [0, 1, 2],
        [3, 0, 1],
        [2, 3, 0],
    ]


def test_load_refuses_a_different_stream():
    state = ResumableSampler(10, seed=0).state_dict()
    with pytest.raises(ValueError, match="num_items=10"):
        ResumableSampler(11, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0"):
        ResumableSampler(10, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid sampler state"):
        ResumableSampler(10, seed=0).load_state_dict({**state, "position": 10})


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_items must be positive"):
        ResumableSampler(0, seed=0)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        ResumableSampler(3, seed=0).next_batch(0)
