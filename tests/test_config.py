"""Configuration: flags, RELAY_* environment variables, and clear errors for bad values."""

from __future__ import annotations

import pytest

from relay.server import parse_config


def test_environment_sets_defaults_and_flags_win() -> None:
    config = parse_config(
        ["--address", "127.0.0.1:7000"],
        {
            "RELAY_ADDRESS": "0.0.0.0:1",
            "RELAY_RETENTION_S": "5",
            "RELAY_LIMIT_STREAM_MAX_CHUNKS": "9",
        },
    )
    assert config.address == "127.0.0.1:7000"
    assert config.retention_s == 5.0
    assert config.limits.stream_max_chunks == 9


def test_defaults_are_the_embedded_ones() -> None:
    config = parse_config([], {})
    assert (config.address, config.db, config.default_producer) == (
        "127.0.0.1:50051",
        "./data/relay.sqlite3",
        "echo",
    )
    assert config.retention_s == 600.0
    assert config.stop_tombstone_s == 60.0


def test_a_bad_environment_value_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config([], {"RELAY_RETENTION_S": "ten minutes"})
    assert "RELAY_RETENTION_S='ten minutes' is not a valid float" in capsys.readouterr().err


def test_the_stop_tombstone_lifetime_is_a_positive_number(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse_config(["--stop-tombstone-s", "5"], {}).stop_tombstone_s == 5.0
    assert parse_config([], {"RELAY_STOP_TOMBSTONE_S": "0.5"}).stop_tombstone_s == 0.5
    for value in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            parse_config(["--stop-tombstone-s", value], {})
        assert "--stop-tombstone-s must be a finite number over 0" in capsys.readouterr().err
