"""A short soak (`make soak` runs the long one): a real relay process under concurrent clients,
SIGKILLed once and restarted, every reader's log checked against the journal (soak.checker)."""

from __future__ import annotations

from soak.run import Config, run_soak


async def test_a_short_soak_with_one_kill_finds_no_violation() -> None:
    config = Config(
        seconds=10,
        streams=4,
        seed=7,
        late_readers=2,
        kills=1,
        kill_first_s=(4.0, 5.0),
        kill_margin_s=3.0,
        loss_slack_s=1.0,  # the whole suite may be loading the machine: the flush can lag
        progress=False,
    )
    outcome = await run_soak(config)
    report = outcome.report
    assert len(outcome.history.kills) == 1, outcome.summary
    assert report.chunk_deliveries > 1_000, outcome.summary
    assert report.chunks_vs_journal > 100, outcome.summary
    assert report.violations == [], outcome.summary
