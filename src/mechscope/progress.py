"""Progress bars for long steps (rich), or nothing when not wanted: `with progress_bar(on, total, label)
as bar: ... bar.advance(n)`."""

from __future__ import annotations


class _Silent:
    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def advance(self, n: int = 1) -> None:
        return None


class _Bar:
    def __init__(self, total: int, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self._task = self._progress.add_task(label, total=total)

    def __enter__(self) -> "_Bar":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)


def progress_bar(enabled: bool, total: int, label: str) -> _Bar | _Silent:
    return _Bar(total, label) if enabled else _Silent()
