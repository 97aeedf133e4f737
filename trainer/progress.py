"""A rich progress bar over optimizer steps showing the live loss (no-op when disabled)."""

from __future__ import annotations

from typing import Any


class _NoBar:
    def update(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _RichBar:
    def __init__(self, total: int, done: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self.task = self.progress.add_task("train", total=total, completed=done, info="")
        self.progress.start()

    def update(self, row: dict[str, Any]) -> None:
        info = (f"step {row['step']} loss {row['loss']:.4f} λ {row['kl_weight']:.3f} "
                f"len {row['response_len_mean']:.0f}")
        self.progress.update(self.task, advance=1, info=info)

    def close(self) -> None:
        self.progress.stop()


def progress_bar(total: int, done: int, enabled: bool):
    return _RichBar(total, done) if enabled else _NoBar()
