"""pipeline.predict.piece_groups: pieces joined as they arrive, a group handed out once all of it is final."""

from __future__ import annotations

from pipeline.predict.piece_groups import PieceGroups


def test_groups_join_transitively_and_leave_whole_once_every_piece_is_final_in_order_of_their_first_piece():
    groups: PieceGroups[tuple[str, int]] = PieceGroups()
    a, _b, c, d = (groups.add(piece) for piece in (("a", 0), ("b", 1), ("c", 1), ("d", 2)))
    groups.join(c, a)
    groups.join(d, c)  # a - c - d: one group through c
    assert groups.pop_finished(lambda piece: piece[1] < 2) == [[("b", 1)]]  # a's group waits for d
    assert groups.items() == [(a, ("a", 0)), (c, ("c", 1)), (d, ("d", 2))] and groups[c] == ("c", 1)
    e = groups.add(("e", 3))
    assert e == 4  # arrival numbers are never reused
    assert groups.pop_finished(lambda piece: True) == [[("a", 0), ("c", 1), ("d", 2)], [("e", 3)]]
    assert groups.items() == [] and groups.pop_finished(lambda piece: True) == []
