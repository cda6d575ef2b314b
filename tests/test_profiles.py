"""Producer profiles from a TOML file: parsing, clear errors, a relay that refuses a bad file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.producers import EchoProducer
from relay.producers.profiles import Profile, ProfileError, build_producers, load_profiles

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "producers.toml"
    path.write_text(text)
    return path


def test_profiles_load_with_their_fields_and_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [producers.gpt]
        kind = "openai"
        base_url = "http://127.0.0.1:11434/v1"
        model = "llama3.2"
        api_key_env = "OLLAMA_KEY"
        idle_timeout_s = 20
        options = { temperature = 0.2 }

        [producers.slow-echo]
        kind = "echo"
        options = { delay_ms = 100 }
        """,
    )
    profiles = load_profiles(path)
    assert profiles["gpt"] == Profile(
        name="gpt",
        kind="openai",
        base_url="http://127.0.0.1:11434/v1",
        model="llama3.2",
        api_key_env="OLLAMA_KEY",
        idle_timeout_s=20,
        options={"temperature": "0.2"},
    )
    producers = build_producers({"slow-echo": profiles["slow-echo"]})
    assert set(producers) == {"echo", "slow-echo"}
    slow = producers["slow-echo"]
    assert isinstance(slow, EchoProducer) and slow.delay_ms == 100


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[producers.x]\nkind = 'telepathy'", "kind must be one of echo, openai, grpc"),
        ("[producers.x]\nkind = 'echo'\ncolour = 'red'", "unknown fields ['colour']"),
        (
            "[producers.x]\nkind = 'grpc'\nidle_timeout_s = 'soon'",
            "idle_timeout_s must be a number",
        ),
        ("[producers.x]\nkind = 'echo'\noptions = 3", "options must be a table"),
        ("producers = 3", "[producers] must be a table"),
        ("[producers.x\nkind = 'echo'", "producers.toml"),
    ],
)
def test_a_malformed_file_names_what_is_wrong(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ProfileError) as caught:
        load_profiles(write(tmp_path, text))
    assert error in str(caught.value)


def test_the_relay_refuses_to_start_with_a_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[producers.x]\nkind = 'telepathy'")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay.server",
            "--producers",
            str(path),
            "--db",
            str(tmp_path / "db"),
            "--address",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "stream-relay:" in result.stderr and "kind must be one of" in result.stderr
    assert "Traceback" not in result.stderr
