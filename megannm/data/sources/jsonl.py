"""JSONL records (megannm's own format): one JSON object a line, image paths relative to the file.

Lines are handed on unparsed (the worker processes parse them), with ``file:line`` as their place."""
from __future__ import annotations

from typing import Iterator, Optional

from megannm.data.sources import Item, Source


class JsonlSource(Source):
    kind = "jsonl"

    def count(self) -> Optional[int]:
        total = 0
        for path in self.inputs:
            with open(path, encoding="utf-8") as f:
                n = sum(1 for line in f if line.strip())
            self.counts[path.name] = n
            total += n
        return total

    def describe(self) -> list[dict]:
        if not self.counts:
            self.count()
        return super().describe()

    def __iter__(self) -> Iterator[Item]:
        for path in self.inputs:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield Item(f"{path.name}:{lineno}", line, base_dir=str(path.parent))
