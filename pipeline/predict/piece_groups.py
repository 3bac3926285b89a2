"""Pieces joined into groups as they arrive, each group handed out once all its pieces are final.

What pipeline.predict.objects (an image's window pieces -> objects) and pipeline.predict.clips (a
video's clip pieces -> tracks) both do: a union-find over the pieces' arrival numbers, in which a
group leaves (`pop_finished`) when the caller says every piece of it can no longer be joined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

P = TypeVar("P")


class PieceGroups(Generic[P]):
    """Open pieces by arrival number, and which of them belong together."""

    def __init__(self) -> None:
        self._pieces: dict[int, P] = {}  # the open pieces, by arrival number
        self._parent: dict[int, int] = {}  # union-find over arrival numbers
        self._next = 0

    def add(self, piece: P) -> int:
        """A new piece, in a group of its own; its arrival number."""
        i = self._next
        self._next += 1
        self._pieces[i], self._parent[i] = piece, i
        return i

    def __getitem__(self, i: int) -> P:
        return self._pieces[i]

    def items(self) -> list[tuple[int, P]]:
        """The open pieces, in arrival order (a copy: pieces may be added meanwhile)."""
        return list(self._pieces.items())

    def join(self, i: int, j: int) -> None:
        """Pieces i and j (and their groups) belong together."""
        self._parent[self._root(i)] = self._root(j)

    def _root(self, i: int) -> int:
        while self._parent[i] != i:
            self._parent[i] = self._parent[self._parent[i]]
            i = self._parent[i]
        return i

    def pop_finished(self, is_final: Callable[[P], bool]) -> list[list[P]]:
        """Remove and return the groups all of whose pieces are final, each in arrival order, the
        groups in order of their first piece."""
        groups: dict[int, list[int]] = {}
        for i in self._pieces:
            groups.setdefault(self._root(i), []).append(i)
        finished = []
        for members in sorted(groups.values()):
            pieces = [self._pieces[i] for i in members]
            if all(is_final(piece) for piece in pieces):
                finished.append(pieces)
                for i in members:
                    del self._pieces[i]
        for i in [i for i in self._parent if i not in self._pieces]:  # whole groups left: no open piece points here
            del self._parent[i]
        return finished
