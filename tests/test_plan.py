"""The epoch plan: a pure function of (layout, seed, epoch, world); no Ray needed."""

from __future__ import annotations

import numpy as np
import pytest

from posefr_dist.data.plan import EpochPlan, SplitLayout, resolve_window, window_chunks_for

LAYOUT = SplitLayout(("a", "b", "c"), ((64, 64, 20), (64, 64, 64), (30,)))


def _plan(**kw) -> EpochPlan:
    args = dict(seed=7, epoch=0, world=2, chunk_rows=32, window_chunks=3)
    args.update(kw)
    return EpochPlan(LAYOUT, **args)


def test_chunks_never_cross_row_groups_and_cover_every_row():
    ch = LAYOUT.chunks(32)
    assert (ch[:, 2] - ch[:, 1] <= 32).all()
    # a row group of file 0 spans [64, 128): no chunk straddles 64 or 128
    for f, a, b in ch:
        bounds = np.cumsum((0,) + LAYOUT.row_groups[f])
        assert any(lo <= a and b <= hi for lo, hi in zip(bounds[:-1], bounds[1:]))
    gids = np.concatenate([LAYOUT.offsets[f] + np.arange(a, b) for f, a, b in ch])
    np.testing.assert_array_equal(gids, np.arange(LAYOUT.total_rows))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_get_equal_disjoint_shares(world):
    p = _plan(world=world)
    seqs = [p.sequence(r) for r in range(world)]
    assert {len(s) for s in seqs} == {p.rows_per_rank}
    allrows = np.concatenate(seqs)
    assert len(np.unique(allrows)) == len(allrows), "a row went to two ranks or twice to one"
    # the equal-share cut leaves out at most world - 1 rows
    assert len(allrows) == LAYOUT.total_rows - LAYOUT.total_rows % world


def test_same_inputs_same_plan_and_each_epoch_differs():
    a = [_plan().sequence(r) for r in range(2)]
    b = [_plan().sequence(r) for r in range(2)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    other_epoch = _plan(epoch=1).sequence(0)
    other_seed = _plan(seed=8).sequence(0)
    assert not np.array_equal(a[0][: len(other_epoch)], other_epoch[: len(a[0])])
    assert not np.array_equal(a[0][: len(other_seed)], other_seed[: len(a[0])])


def test_rows_are_shuffled_only_within_their_window():
    p = _plan()
    for w in p.windows(1):
        rows = p.sequence(1)[w.start:w.start + w.rows]
        assert set(rows) == set(p.piece_gids(w.pieces))
    unshuffled = _plan(shuffle_rows=False, shuffle_chunks=False, world=1).sequence(0)
    np.testing.assert_array_equal(unshuffled, np.arange(len(unshuffled)))


def test_locate_finds_the_window_of_a_position():
    p = _plan()
    seq = p.sequence(0)
    for pos in (0, 31, 32, 95, 96, len(seq) - 1):
        w, off = p.locate(0, pos)
        win = p.windows(0)[w]
        assert win.start + off == pos


def test_bad_rows_are_replaced_by_the_next_good_row_of_their_window():
    gids = np.arange(10, 18)
    order = np.array([3, 1, 7, 0, 2, 6, 5, 4])
    valid = np.ones(8, bool)
    valid[[1, 0]] = False  # gids 11 and 10: shuffled positions 1 and 3
    out = resolve_window(gids, order, valid)
    np.testing.assert_array_equal(out, [13, 17, 17, 12, 12, 16, 15, 14])
    # the last shuffled position wraps around to the first good one
    valid2 = np.ones(8, bool)
    valid2[4] = False
    assert resolve_window(gids, order, valid2)[-1] == 13
    with pytest.raises(ValueError, match="every one of the 8 rows of window 5 is bad"):
        resolve_window(gids, order, np.zeros(8, bool), 5)


def test_sequence_with_bad_rows_keeps_its_length_and_avoids_them():
    p = _plan()
    valid = np.ones(LAYOUT.total_rows, bool)
    valid[::7] = False
    for r in range(2):
        s = p.sequence(r, valid)
        assert len(s) == p.rows_per_rank and valid[s].all()


def test_window_size_from_the_shuffle_buffer():
    assert window_chunks_for(512, 64) == 8
    assert window_chunks_for(100, 64) == 2
    assert window_chunks_for(0, 64) == 1
