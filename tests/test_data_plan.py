"""The data plan's rules, as properties over rows, batch sizes, world sizes and targets.

Each rule of :mod:`skdeep._data_plan` is checked on the plan itself: every rank's plan
is made on its own, as the ranks make them, and the ranks' parts are then put side by
side.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skdeep._data_plan import (
    MIN_PART_WITH_BATCH_NORM,
    DataPlan,
    agree_seed,
    evaluation_rows,
    rank_seed,
    regroup,
)

world_sizes = st.integers(1, 5)
min_parts = st.sampled_from([1, MIN_PART_WITH_BATCH_NORM])


@st.composite
def plan_settings(draw):
    """Rows, a batch size that is a multiple of the world size, the world, a seed, a min part."""
    world = draw(world_sizes)
    batch_size = world * draw(st.integers(1, 12))
    n_rows = draw(st.integers(1, 5 * batch_size + 7))
    seed = draw(st.integers(0, 2**31 - 1))
    return n_rows, batch_size, world, seed, draw(min_parts)


def plans(n_rows, batch_size, world, seed, min_part):
    """Every rank's plan, each made on its own (None when the plan refuses)."""
    try:
        return [DataPlan(n_rows, batch_size, world, rank, seed, min_part) for rank in range(world)]
    except ValueError:
        return None


def can_cut(n_rows, batch_size, world, min_part) -> bool:
    """Whether any cut gives every part ``min_part`` images (the refusal rule, stated apart)."""
    return batch_size // world >= min_part and n_rows > (min_part - 1) * world


def global_batches(rank_steps):
    """Join the ranks' parts of each step into the global batch, checking their shares."""
    batches = []
    for parts in zip(*rank_steps, strict=True):
        size = parts[0].global_size
        assert all(part.global_size == size for part in parts)
        assert [part.share for part in parts] == [
            slice(rank * len(parts[0].rows), (rank + 1) * len(parts[0].rows))
            for rank in range(len(parts))
        ]
        batch = np.concatenate([part.rows for part in parts])
        assert len(batch) == size
        batches.append(batch)
    return batches


@settings(max_examples=300, deadline=None)
@given(plan_settings(), st.integers(1, 4))
def test_every_rank_takes_equal_steps_and_every_row_trains_once_per_epoch(values, epoch):
    """Equal steps and parts on every rank; each row once, fewer than world repeats."""
    n_rows, batch_size, world, _, min_part = values
    ranks = plans(*values)
    if ranks is None:
        assert not can_cut(n_rows, batch_size, world, min_part)
        return
    steps = [plan.epoch(epoch) for plan in ranks]
    assert {len(rank) for rank in steps} == {ranks[0].steps_per_epoch}
    batches = global_batches(steps)
    counts = Counter(np.concatenate(batches).tolist())
    assert set(counts) == set(range(n_rows))  # every row, no other
    repeats = sum(counts.values()) - n_rows
    assert repeats < world
    # Repeats pad the last batch only, with the first rows of the epoch's order.
    order = np.concatenate(batches)[:n_rows]
    if repeats:
        assert batches[-1][-repeats:].tolist() == np.resize(order, repeats).tolist()


@settings(max_examples=300, deadline=None)
@given(plan_settings())
def test_parts_are_never_smaller_than_batch_norm_accepts(values):
    """Every part holds ``min_part`` images, or the plan refuses when no cut can."""
    n_rows, batch_size, world, _, min_part = values
    ranks = plans(*values)
    assert (ranks is not None) == can_cut(n_rows, batch_size, world, min_part)
    if ranks is None:
        return
    for rank in ranks:
        for step in [*rank.epoch(1), *rank.in_order()]:
            assert len(step.rows) >= min_part


@settings(max_examples=300, deadline=None)
@given(plan_settings())
def test_global_batches_are_batch_size_but_the_last(values):
    """Full batches of batch_size; the last one at most (min_part - 1) * world larger."""
    _, batch_size, world, _, min_part = values
    ranks = plans(*values)
    if ranks is None:
        return
    sizes = [len(batch) for batch in global_batches([rank.epoch(1) for rank in ranks])]
    assert all(size == batch_size for size in sizes[:-1])
    assert 1 <= sizes[-1] <= batch_size + (min_part - 1) * world
    assert sizes[-1] % world == 0


@settings(max_examples=200, deadline=None)
@given(plan_settings())
def test_n_ranks_take_the_global_batches_of_one_process_when_the_rule_says_so(values):
    """The docstring's condition: the last batch needs neither padding nor merging."""
    n_rows, batch_size, world, seed, min_part = values
    ranks, alone = plans(*values), plans(n_rows, batch_size, 1, seed, min_part)
    if ranks is None or alone is None:
        return
    rest = n_rows % batch_size
    if rest == 0 or (rest % world == 0 and rest > (min_part - 1) * world):
        together = global_batches([rank.epoch(2) for rank in ranks])
        one = global_batches([alone[0].epoch(2)])
        assert [b.tolist() for b in together] == [b.tolist() for b in one]


@settings(max_examples=300, deadline=None)
@given(plan_settings(), st.integers(1, 40), st.integers(1, 3))
def test_target_batches_cycle_over_any_number_of_targets(values, n_target, epochs):
    """Each step's target part matches its source part; the stream runs in whole passes."""
    ranks = plans(*values)
    if ranks is None:
        return
    stream = []
    for epoch in range(1, epochs + 1):
        source = [rank.epoch(epoch) for rank in ranks]
        target = [rank.target_epoch(epoch, n_target) for rank in ranks]
        source_steps = zip(*source, strict=True)
        target_steps = zip(*target, strict=True)
        for source_parts, target_parts in zip(source_steps, target_steps, strict=True):
            assert [len(p.rows) for p in source_parts] == [len(p.rows) for p in target_parts]
            assert [p.share for p in source_parts] == [p.share for p in target_parts]
        stream.extend(np.concatenate(global_batches(target)).tolist())
    for start in range(0, len(stream) - n_target + 1, n_target):
        assert sorted(stream[start : start + n_target]) == list(range(n_target))
    tail = stream[len(stream) - len(stream) % n_target :]
    assert len(set(tail)) == len(tail)


@settings(max_examples=100, deadline=None)
@given(plan_settings(), st.integers(1, 40))
def test_recalibration_passes_cover_rows_in_order(values, n_target):
    """in_order: every row in its order (then pads); targets cycled in order, same steps."""
    n_rows = values[0]
    ranks = plans(*values)
    if ranks is None:
        return
    rows = np.concatenate(global_batches([rank.in_order() for rank in ranks]))
    assert rows[:n_rows].tolist() == list(range(n_rows))
    targets = np.concatenate(global_batches([rank.target_in_order(n_target) for rank in ranks]))
    assert targets.tolist() == (np.arange(len(rows)) % n_target).tolist()


@settings(max_examples=50, deadline=None)
@given(plan_settings())
def test_a_plan_is_a_function_of_its_inputs(values):
    """The same inputs give the same steps; another epoch shuffles anew."""
    first, second = plans(*values), plans(*values)
    if first is None:
        return
    for a, b in zip(first, second, strict=True):
        assert [s.rows.tolist() for s in a.epoch(3)] == [s.rows.tolist() for s in b.epoch(3)]


def test_epochs_and_seeds_shuffle_differently():
    """Another epoch or another seed gives another order (100 rows: no chance match)."""
    orders = {
        (seed, epoch): np.concatenate([s.rows for s in DataPlan(100, 10, seed=seed).epoch(epoch)])
        for seed in (0, 1)
        for epoch in (1, 2)
    }
    assert len({tuple(order.tolist()) for order in orders.values()}) == 4


@pytest.mark.parametrize(
    "n_rows, batch_size, devices, message",
    [
        (2, 8, 2, r"2 training image\(s\) with batch_size=8 and devices=2 give each process "
         r"1 image\(s\) at a step, but it needs at least 2 \(why\): train on at least 3 "
         r"images, use fewer processes, or freeze"),
        (1, 8, None, r"1 training image\(s\) with batch_size=8 give the network 1 image\(s\) "
         r"at a step, but it needs at least 2 \(why\): train on at least 2 images, or freeze"),
        (100, 2, 2, r"batch_size=2 and devices=2 give each process 1 image\(s\) of a batch, "
         r"but it needs at least 2 \(why\): use batch_size=4 or more"),
        (10, 7, 2, r"batch_size=7 must be a multiple of the 2 processes of devices=2"),
        (0, 8, None, r"no training image\(s\)"),
    ],
)  # fmt: skip
def test_refusals_name_batch_size_devices_and_the_rows(n_rows, batch_size, devices, message):
    """What cannot be cut is refused with the settings to change, and why."""
    world = devices or 1
    with pytest.raises(ValueError, match=message):
        DataPlan(
            n_rows, batch_size, world, min_part=MIN_PART_WITH_BATCH_NORM, devices=devices,
            why="why",
        )  # fmt: skip


def test_domains_apart_need_one_rank():
    """batch_norm='per_domain' cannot run under DistributedDataParallel: named."""
    with pytest.raises(ValueError, match=r"batch_norm='per_domain'.*batch_norm='joint'"):
        DataPlan(16, 8, 2, domains_apart=True)
    assert DataPlan(16, 8, 1, domains_apart=True).steps_per_epoch == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=8), st.data())
def test_regroup_recuts_loaded_batches_into_the_step_sizes(loaded, data):
    """Re-cut batches give the same images, in order, in the sizes asked."""
    total = sum(loaded)
    cuts = sorted(data.draw(st.sets(st.integers(1, total - 1), max_size=5))) if total > 1 else []
    sizes = np.diff([0, *cuts, total]).tolist()
    images = torch.arange(total)
    batches = torch.split(images, loaded)
    out = list(regroup(batches, sizes))
    assert [len(batch) for batch in out] == sizes
    assert torch.equal(torch.cat(out), images)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), world_sizes)
def test_evaluation_rows_share_every_row_once(n_rows, world):
    """Validation rows: each scored by exactly one rank, shares within one of each other."""
    rows = np.arange(n_rows) * 3
    shares = [evaluation_rows(rows, rank, world) for rank in range(world)]
    assert np.concatenate(shares).tolist() == rows.tolist()
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_seeds_rank_zero_keeps_the_shared_seed_and_others_differ():
    """rank_seed: rank 0's stream is the shared one (one process draws as before)."""
    assert rank_seed(1234, 0) == 1234
    others = {rank_seed(1234, rank) for rank in range(1, 8)}
    assert len(others) == 7 and 1234 not in others
    assert agree_seed(5) == 5
    assert agree_seed(None) != agree_seed(None)  # fresh from the system, alone


def test_padding_repeats_the_first_rows_of_the_epoch():
    """15 rows, batch 8, two ranks: the last batch of 7 gets the epoch's first row again."""
    plans_ = [DataPlan(15, 8, 2, rank, seed=3, min_part=2) for rank in range(2)]
    batches = global_batches([plan.epoch(1) for plan in plans_])
    assert [len(batch) for batch in batches] == [8, 8]
    assert batches[-1][-1] == batches[0][0]
    assert math.ceil(7 / 2) == len(plans_[0].epoch(1)[-1].rows)


def test_a_last_part_of_one_image_joins_the_batch_before():
    """10 rows, batch 8, two ranks, batch norm: 8 + 2 would give parts of one: one batch of 10."""
    plan = DataPlan(10, 8, 2, min_part=2)
    assert plan.steps_per_epoch == 1 and plan.epoch(1)[0].global_size == 10
    alone = DataPlan(9, 8, 1, min_part=2)  # one process: a last batch of one joins too
    assert [step.global_size for step in alone.epoch(1)] == [9]
    assert [s.global_size for s in DataPlan(9, 8, 1, min_part=1).epoch(1)] == [8, 1]
