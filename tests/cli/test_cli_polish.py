"""CLI polish: version, ``python -m converge``, help texts, one-line errors, warnings."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import pytest
from cli_helpers import EXAMPLE, ROOT, converge_cli

import converge


def test_version_and_python_dash_m_converge() -> None:
    result = converge_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"converge {converge.__version__}"


SUBCOMMANDS = [
    ["gateway"],
    ["webhook"],
    ["webhook", "sign"],
    ["webhook", "send"],
]


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_help_starts_with_a_description(argv: list[str]) -> None:
    from converge.cli.commands import _parser

    parser = _parser()
    for name in argv:  # walk down to the subcommand's own parser
        sub = next(a for a in parser._actions if a.dest in ("command", "action", "what"))
        parser = sub.choices[name]  # type: ignore[index]
    assert parser.description, argv
    assert len(parser.description) > 30
    assert parser.description.splitlines()[0] in parser.format_help()


def test_every_listed_subcommand_has_help_text() -> None:
    result = converge_cli("--help")
    assert result.returncode == 0
    for name in ("gateway", "webhook"):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name))
        assert len(line.split()) > 2, line  # "name  what it does"


def test_address_already_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = converge_cli(
            "gateway",
            "--config",
            str(EXAMPLE),
            "--port",
            str(port),
            "--store",
            "memory",
            cwd=tmp_path,
        )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "WARNING" not in line]
    assert errors == [
        f"error: cannot listen on 127.0.0.1:{port}: address already in use "
        "(is another gateway running? use --port)"
    ]
    assert "Traceback" not in result.stderr + result.stdout


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_a_missing_secret_names_the_section_and_the_unset_variable(tmp_path: Path) -> None:
    config = write(
        tmp_path / "g.toml",
        """
        [providers.stripe]
        scheme = "stripe"
        secret_env = ["CONVERGE_TEST_UNSET_A", "CONVERGE_TEST_UNSET_B"]
        """,
    )
    result = converge_cli("gateway", "--config", str(config), "--check")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: [providers.stripe] has no secret: environment variables are not set: "
        "CONVERGE_TEST_UNSET_A / CONVERGE_TEST_UNSET_B"
    )


def test_a_named_but_unset_signing_secret_is_an_error_not_a_silent_downgrade(
    tmp_path: Path,
) -> None:
    config = write(
        tmp_path / "g.toml",
        """
        [targets.app]
        url = "http://127.0.0.1:9/x"
        signing_secret_env = "CONVERGE_TEST_UNSET_SIGNING"
        """,
    )
    result = converge_cli("gateway", "--config", str(config), "--check")
    assert result.returncode == 2
    assert "[targets.app]" in result.stderr
    assert "CONVERGE_TEST_UNSET_SIGNING" in result.stderr


def test_an_invalid_provider_option_names_its_section(tmp_path: Path) -> None:
    config = write(
        tmp_path / "g.toml",
        """
        [providers.ours]
        scheme = "no-such-scheme"
        secret = "s"
        """,
    )
    result = converge_cli("gateway", "--config", str(config), "--check")
    assert result.returncode == 2
    assert result.stderr.startswith("error: [providers.ours] ")


def test_a_config_without_providers_warns(tmp_path: Path) -> None:
    config = write(tmp_path / "g.toml", '[gateway]\nstore = "memory"\n')
    result = converge_cli("gateway", "--config", str(config), "--check")
    assert result.returncode == 0, result.stderr
    assert "configures no provider" in result.stderr
    assert " WARNING converge.gateway " in result.stderr


def test_bad_json_in_data_reports_line_and_column() -> None:
    result = converge_cli(
        "webhook", "sign", "--scheme", "github", "--secret", "s", "--data", '{"a": 1,\n "b" 2}'
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: the request body is not valid JSON: Expecting ':' delimiter (line 2, column 6)"
    )


def test_log_lines_have_iso_timestamps_and_json_format_is_json(tmp_path: Path) -> None:
    import json

    config = write(tmp_path / "g.toml", '[gateway]\nstore = "memory"\nlog_format = "json"\n')
    result = converge_cli("gateway", "--config", str(config), "--check")
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "WARNING"
    assert "configures no provider" in record["message"]


def test_the_module_entry_point_is_shipped() -> None:
    assert (ROOT / "src" / "converge" / "__main__.py").exists()
