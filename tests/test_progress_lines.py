"""Progress as log lines at a steady cadence: every N units or every S seconds, always the last,
each with the rate and an ETA (pipeline/progress_lines.py)."""

from __future__ import annotations

import logging
import re

from trace_rl.pipeline.progress_lines import PROGRESS_LOGGER, ProgressLines


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]


def test_every_n_units_and_always_the_last(caplog):
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        lines = ProgressLines("hf sampling", 10, "sequences", every_s=1e9, every_n=4)
        for done in range(1, 11):
            lines.update(done, tokens=100 * done)
    got = _lines(caplog)
    assert [int(re.match(r"hf sampling: (\d+)/10 sequences", g).group(1)) for g in got] == [4, 8, 10]
    assert all("tok/s" in g for g in got)
    assert "ETA" in got[0] and got[-1].endswith(tuple(f"done in {n} s" for n in range(60)))


def test_seconds_cadence_says_nothing_in_between(caplog):
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        lines = ProgressLines("train r0", 50, "steps", every_s=1e9)
        for done in range(1, 50):
            lines.update(done, "loss 0.1")
        assert _lines(caplog) == []
        lines = ProgressLines("train r0", 50, "steps", every_s=0.0)
        lines.update(1, "loss 0.1")
    assert _lines(caplog)[0].startswith("train r0: 1/50 steps · loss 0.1 · ETA ")


def test_train_progress_lines_carry_step_loss_reward_lambda_kl_and_rate(caplog, monkeypatch):
    """The trainer's reporter off a terminal: no bar, lines with the step's figures (KL of the
    direction the method reports), the last one always."""
    from trace_rl.trainer.progress import progress_bar

    monkeypatch.setenv("TRACE_PROGRESS_EVERY_S", "1e9")
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        bar = progress_bar(2, 0, enabled=True, round_index=3)
        for step in (12, 13):
            bar.update({"step": step, "loss": 0.5, "kl_weight": 0.25, "kl/reverse": 0.0123,
                        "response_len_mean": 40.0, "tokens": 640, "reward": 0.375})
        bar.close()
    (line,) = _lines(caplog)  # the cadence holds back step 12; the last is always said
    assert re.fullmatch(r"train r3: 2/2 steps · step 13 · loss 0\.5000 · reward 0\.375 · λ 0\.250 · "
                        r"KL 0\.0123 · \d+ tok/s · done in \d+ s", line), line
