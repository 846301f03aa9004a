from __future__ import annotations

import pytest

from consumer.sandbox.cli import build_parser, config_from_args, main
from consumer.sandbox.config import SandboxConfig


def test_defaults_match_the_documented_contract() -> None:
    config = config_from_args(build_parser().parse_args([]))
    assert config == SandboxConfig()
    assert (config.host, config.port) == ("127.0.0.1", 8787)
    assert config.write_tokens == ("sandbox-write-token",)
    assert config.read_tokens == ("sandbox-read-token",)
    assert (config.rate_limit, config.rate_window_seconds, config.retry_after) == (600, 60, False)


def test_flags_build_the_config() -> None:
    args = build_parser().parse_args(
        [
            "--port=0",
            "--write-token=a",
            "--write-token=b",
            "--read-token=r",
            "--rate-limit=10",
            "--rate-window=5",
            "--retry-after",
            "--error-rate=0.2",
            "--error-codes=503",
            "--latency-ms=5",
            "--jitter-ms=2",
            "--reset-rate=0.1",
            "--script=500",
            "--script=reset",
            "--seed=9",
        ]
    )
    config = config_from_args(args)
    assert config.write_tokens == ("a", "b") and config.read_tokens == ("r",)
    assert (config.rate_limit, config.rate_window_seconds, config.retry_after) == (10, 5, True)
    faults = config.faults
    assert (faults.error_rate, faults.error_codes, faults.reset_rate) == (0.2, (503,), 0.1)
    assert (faults.latency_ms, faults.jitter_ms) == (5, 2)
    assert [a.text for a in faults.script] == ["500", "reset"]
    assert config.seed == 9


def test_bad_flags_exit_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--error-rate=2"])
    assert info.value.code == 2
    assert "error_rate" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "says"), [
    (["--jitter-ms=1e400"], "jitter_ms must be a number of milliseconds from 0"),
    (["--latency-ms=nan"], "latency_ms must be a number of milliseconds from 0"),
    (["--latency-ms=4000000"], "latency_ms must be a number of milliseconds from 0"),
    (["--log-level=nope"], "invalid choice"),
    # Review config40: a window of nan or inf lifted the rate limit without a word.
    (["--rate-window=nan"], "rate_window_seconds must be a positive number of seconds"),
    (["--rate-window=inf"], "rate_window_seconds must be a positive number of seconds"),
    # Review cli41: inf broke the second DELETE's answer; nan read as a 1 s interval.
    (["--delete-interval=inf"], "delete_interval_seconds must be 0 (no limit) or positive"),
    (["--delete-interval=nan"], "delete_interval_seconds must be 0 (no limit) or positive"),
])
def test_flags_that_would_hang_or_crash_it_are_usage_errors(
        argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An infinite jitter hung every request; an unknown log level was a traceback
    (review config25)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert says in capsys.readouterr().err


def test_its_own_entry_point_names_itself_and_says_its_version(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review config40: `python -m consumer.sandbox --help` said `usage: __main__.py`, and
    `--version` was an unrecognized argument."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m consumer.sandbox ")
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("python -m consumer.sandbox ")


def test_log_levels_are_taken_in_any_case() -> None:
    assert build_parser().parse_args(["--log-level=debug"]).log_level == "DEBUG"


@pytest.mark.parametrize("action", ["delay:inf", "timeout:nan", "delay:1e12"])
def test_a_scripted_delay_is_bounded_like_the_flags(action: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`--script delay:inf` hung every request although `--latency-ms inf` was refused
    (review diff25)."""
    with pytest.raises(SystemExit) as info:
        main([f"--script={action}"])
    assert info.value.code == 2
    assert "must be at most" in capsys.readouterr().err
