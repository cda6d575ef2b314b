"""Producer profiles from a TOML file: parsing, clear errors, a relay that refuses a bad file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.producers import EchoProducer
from relay.producers.policy import (
    DEFAULT_CLIENT_OPTIONS,
    ChoiceRule,
    ClientOptionPolicy,
    NumberRule,
    ProducerPolicy,
    TextRule,
)
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


def test_client_options_and_subjects_load_as_a_policy(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [producers.gpt]
        kind = "openai"
        base_url = "https://api.openai.com/v1"
        model = "gpt-4o-mini"
        subjects = ["team-a:*", "ops"]
        [producers.gpt.client_options]
        temperature = { min = 0, max = 1.5 }
        max_tokens = { min = 1, max = 2048, integer = true }
        model = { allowed = ["gpt-4o-mini", "gpt-4o"] }

        [producers.backend]
        kind = "grpc"
        target = "127.0.0.1:50061"
        client_options = { voice = { any = true }, speed = { allowed = [1, 1.5] } }

        [producers.closed]
        kind = "openai"
        model = "m"
        client_options = {}
        """,
    )
    profiles = load_profiles(path)
    assert profiles["gpt"].policy == ProducerPolicy(
        ("team-a:*", "ops"),
        ClientOptionPolicy(
            {
                "temperature": NumberRule(0, 1.5),
                "max_tokens": NumberRule(1, 2048, integer=True),
                "model": ChoiceRule(("gpt-4o-mini", "gpt-4o")),
            }
        ),
    )
    assert profiles["backend"].policy == ProducerPolicy(
        ("*",), ClientOptionPolicy({"voice": TextRule(1024), "speed": ChoiceRule(("1", "1.5"))})
    )
    assert profiles["closed"].policy.client_options == ClientOptionPolicy({})


def test_a_profile_without_client_options_gets_its_kind_s_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[producers.a]\nkind = 'openai'\nmodel = 'm'\n[producers.b]\nkind = 'echo'\n"
        "[producers.c]\nkind = 'grpc'\ntarget = 'x:1'\n",
    )
    profiles = load_profiles(path)
    for name, kind in (("a", "openai"), ("b", "echo"), ("c", "grpc")):
        assert profiles[name].policy == ProducerPolicy(("*",), DEFAULT_CLIENT_OPTIONS[kind])
    assert set(DEFAULT_CLIENT_OPTIONS["openai"].rules or {}) == {
        "temperature",
        "top_p",
        "max_tokens",
    }
    assert DEFAULT_CLIENT_OPTIONS["grpc"] == ClientOptionPolicy({})


GPT = "[producers.x]\nkind = 'openai'\nmodel = 'm'\n"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (GPT + "client_options = 3", "client_options must be a table"),
        (
            GPT + "client_options = { temperature = 1 }",
            "client_options.temperature must be a table",
        ),
        (
            GPT + "client_options = { temperature = { min = 2, max = 1 } }",
            "client_options.temperature: min must not be more than max",
        ),
        (
            GPT + "client_options = { temperature = { min = 0 } }",
            "client_options.temperature: a number needs both min and max",
        ),
        (
            GPT + "client_options = { temperature = { min = 'low', max = 1 } }",
            "client_options.temperature: min and max must be numbers",
        ),
        (
            GPT + "client_options = { temperature = { min = false, max = 1 } }",
            "client_options.temperature: min and max must be numbers",
        ),
        (
            GPT + "client_options = { temperature = { min = 0, max = nan } }",
            "client_options.temperature: min and max must be numbers",
        ),
        (
            GPT + "client_options = { max_tokens = { min = 1, max = 9, integer = 'yes' } }",
            "client_options.max_tokens: integer must be true or false",
        ),
        (GPT + "client_options = { model = { allowed = [] } }", "allowed must be a non-empty list"),
        (
            GPT + "client_options = { model = { allowed = [['a']] } }",
            "client_options.model: allowed must list strings or numbers",
        ),
        (
            GPT + "client_options = { model = { allowed = ['a'], min = 1 } }",
            "client_options.model: unknown fields ['min']",
        ),
        (
            GPT + "client_options = { system = { any = false } }",
            "client_options.system: any must be true",
        ),
        (
            GPT + "client_options = { system = { any = true, max_chars = 0 } }",
            "client_options.system: max_chars must be a whole number of at least 1",
        ),
        (
            GPT + "client_options = { system = { colour = 'red' } }",
            "client_options.system must have min and max, allowed, or any",
        ),
        (
            GPT + "client_options = { temprature = { min = 0, max = 1 } }",
            "client_options: the openai producer has no options ['temprature']; it has: model",
        ),
        (
            "[producers.x]\nkind = 'echo'\nclient_options = { speed = { any = true } }",
            "the echo producer has no options ['speed']; it has: delay_ms, chunks",
        ),
        (GPT + "subjects = 'alice'", "subjects must be a list of patterns"),
        (GPT + "subjects = [1]", "subjects must be a list of patterns"),
    ],
)
def test_a_malformed_client_policy_names_file_profile_and_field(
    tmp_path: Path, text: str, error: str
) -> None:
    with pytest.raises(ProfileError) as caught:
        load_profiles(write(tmp_path, text))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'producers.toml'}: producer 'x': "), message
    assert error in message


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
