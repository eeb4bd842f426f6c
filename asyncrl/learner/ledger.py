"""A bounded memory of group ids: the learner's record of what it trained recently (contract 4
without unbounded growth, contract 7). Must never import rollout code."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Iterator


class RecentIds:
    """The last `capacity` distinct ids added, oldest forgotten first; O(1) membership."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, ids: Iterable[str]) -> None:
        for gid in ids:
            self._ids[gid] = None
            self._ids.move_to_end(gid)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, gid: object) -> bool:
        return gid in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)
