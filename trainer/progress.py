"""Progress over a round's optimizer steps: log lines at a steady cadence, and a rich bar showing
the live loss on a terminal (no-op when disabled)."""

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


class _Lines:
    """Log lines at a steady cadence (pipeline/progress_lines.py): step, loss, reward, λ, KL,
    tok/s; with a rich bar beside them on a terminal."""

    def __init__(self, total: int, done: int, round_index: int, bar: _RichBar | _NoBar):
        from trace_rl.pipeline.progress_lines import ProgressLines

        self.lines = ProgressLines(f"train r{round_index}", total, "steps", done=done)
        self.done, self.tokens, self.bar = done, 0, bar

    def update(self, row: dict[str, Any]) -> None:
        self.bar.update(row)
        self.done += 1
        self.tokens += int(row.get("tokens") or 0)
        kl = next((row[k] for k in ("kl/forward", "kl/reverse", "kl/jsd") if row.get(k) is not None),
                  None)
        figures = [f"step {row['step']}", f"loss {row['loss']:.4f}"]
        if row.get("reward") is not None:
            figures.append(f"reward {row['reward']:.3f}")
        figures.append(f"λ {row['kl_weight']:.3f}")
        figures.append("KL -" if kl is None else f"KL {kl:.4f}")
        self.lines.update(self.done, " · ".join(figures), tokens=self.tokens or None)

    def close(self) -> None:
        self.bar.close()


def progress_bar(total: int, done: int, enabled: bool, round_index: int = 0):
    """Progress of a round's optimizer steps: nothing when disabled; else log lines, and a rich
    bar too when stderr is a terminal (a bar in a log file is noise)."""
    if not enabled:
        return _NoBar()
    from trace_rl.pipeline.progress_lines import on_terminal

    return _Lines(total, done, round_index, _RichBar(total, done) if on_terminal() else _NoBar())
