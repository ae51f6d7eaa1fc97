"""A start-up error reaches the user even when another rank exits first.

torchrun stops every worker as soon as one exits; when rank 1 returned at once, rank 0 could
be killed before it printed, and the job ended without its message (seen in a full test run).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dapo_megatron import trainer

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
ARGV = ["--config", str(TINY), "trainer.no_such_key=1"]


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    calls: list[float] = []
    monkeypatch.setattr(trainer.time, "sleep", calls.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    return calls


def test_rank_zero_prints_at_once(sleeps, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    assert trainer.main(ARGV) == trainer.STARTUP_ERROR_EXIT_CODE
    assert sleeps == []
    err = capsys.readouterr().err
    assert err.startswith("error: ConfigError: ") and "trainer.no_such_key" in err, err


def test_another_rank_waits_for_rank_zero_then_prints_what_it_met(sleeps, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert trainer.main(ARGV) == trainer.STARTUP_ERROR_EXIT_CODE
    assert sleeps == [trainer.STARTUP_ERROR_GRACE_S]
    err = capsys.readouterr().err
    assert err.startswith("error (rank 1): ConfigError: ") and "trainer.no_such_key" in err, err
