"""Every problem of one pass over a dataset, grouped by kind, reported at once.

Stopping at the first fault makes a user fix one kind of fault per round: a CSV with bad label values,
missing files and truncated images takes three runs to get through. Instead, the adapters and
``prepare`` add each problem they meet to a :class:`Problems` and the caller raises once, at the end of
the pass, with every kind listed (the first ``limit`` of each, with file and CSV row) and its remedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cass.errors import DataError

LIMIT = 20


@dataclass
class Problems:
    """What is wrong with a dataset, by kind (``file not found``, ``no label``, ...), in the order met."""

    limit: int = LIMIT
    _messages: dict[str, list[str]] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _remedies: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, message: str, remedy: str | None = None) -> None:
        """Record one problem; ``remedy`` says once, for the whole kind, what to do about it."""
        self._counts[kind] = self._counts.get(kind, 0) + 1
        shown = self._messages.setdefault(kind, [])
        if len(shown) < self.limit:
            shown.append(message)
        if remedy and kind not in self._remedies:
            self._remedies[kind] = remedy

    def set_remedy(self, kind: str, remedy: str) -> None:
        """Replace the remedy of a kind, once the pass knows better (e.g. which setting finds the files)."""
        self._remedies[kind] = remedy

    def __len__(self) -> int:
        return sum(self._counts.values())

    def __bool__(self) -> bool:
        return bool(self._counts)

    def count(self, kind: str) -> int:
        return self._counts.get(kind, 0)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._counts)

    def report(self, header: str) -> str:
        total, kinds = len(self), len(self._counts)
        lines = [f"{header}: {total} problem(s) of {kinds} kind(s)"]
        for kind, count in self._counts.items():
            remedy = self._remedies.get(kind)
            lines.append(f"{kind} ({count})" + (f": {remedy}" if remedy else ""))
            lines.extend(f"  - {m}" for m in self._messages[kind])
            if count > len(self._messages[kind]):
                lines.append(f"  ... and {count - len(self._messages[kind])} more")
        return "\n".join(lines)

    def raise_if_any(self, header: str) -> None:
        if self:
            raise DataError(self.report(header))
