"""Progress bars for long passes, on stderr so they never mix with results."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")

# Library callers get no bars unless they ask; the CLI switches them on.
_enabled = os.environ.get("LORA_COMPILE_PROGRESS", "0") == "1"
stderr = Console(stderr=True)


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if not _enabled:
        yield from items
        return
    if not stderr.is_terminal:
        # No live bar in a log or a pipe: one line per pass says what the run is doing.
        count = total if total is not None else len(items) if hasattr(items, "__len__") else None
        stderr.print(f"{description}" + (f" ({count} steps)" if count is not None else ""), highlight=False)
        yield from items
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)
