"""Settings: keyring parsing that never echoes key material, list parsing, and docs that can't rot."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from voicerelay.cli import main
from voicerelay.settings import Settings, get_settings, parse_keyring

CONFIG = Path(__file__).resolve().parent.parent / "config"
FIELDS = {name.upper() for name in Settings.model_fields}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Material that must never appear in an error: a valid-looking key of the wrong length, a
# non-base64 secret, and a good key next to a malformed entry.
SECRET_SHORT = _b64(b"S" * 31)
SECRET_NOT_BASE64 = "not*base64*sekrit*value"
SECRET_GOOD = _b64(b"G" * 32)

MALFORMED_RINGS = [
    f"k1:{SECRET_SHORT}",
    f"k1:{SECRET_NOT_BASE64}",
    f"k1:{SECRET_GOOD},{SECRET_GOOD}",  # second entry lacks its kid
    f"k1:{SECRET_GOOD},k1:{SECRET_GOOD}",  # repeated kid
    f"bad kid!:{SECRET_GOOD}",
    f":{SECRET_GOOD}",
]


def _assert_no_key_material(text: str) -> None:
    for secret in (SECRET_SHORT, SECRET_NOT_BASE64, SECRET_GOOD):
        assert secret not in text
        assert secret[:12] not in text


def test_valid_keyring_keeps_order_and_first_is_active() -> None:
    first, second = os.urandom(32), os.urandom(32)
    ring = parse_keyring(
        f" new:{_b64(first)} , old:{base64.b64encode(second).decode()},", key_bytes=32
    )
    assert ring == [("new", first), ("old", second)]


@pytest.mark.parametrize("raw", MALFORMED_RINGS)
def test_keyring_errors_never_contain_key_material(raw: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_keyring(raw, key_bytes=32)
    _assert_no_key_material(str(caught.value))


@pytest.mark.parametrize("raw", MALFORMED_RINGS)
def test_settings_validation_errors_never_contain_key_material(raw: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(signing_keys=raw)
    _assert_no_key_material(str(caught.value))
    _assert_no_key_material(repr(caught.value))
    with pytest.raises(ValidationError) as caught:
        Settings(encryption_keys=raw)
    _assert_no_key_material(str(caught.value))


def test_command_line_reports_a_bad_keyring_without_its_material() -> None:
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["migrate"], env={"SIGNING_KEYS": f"k1:{SECRET_SHORT}"})
    finally:
        get_settings.cache_clear()
    assert result.exit_code != 0
    assert "invalid configuration" in result.output
    _assert_no_key_material(result.output)


def test_lists_are_read_as_comma_separated_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CORS_ALLOWED_ORIGINS", " https://app.example.com ,https://admin.example.com,, "
    )
    monkeypatch.setenv("TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7")
    settings = Settings()
    assert settings.cors_allowed_origins == ["https://app.example.com", "https://admin.example.com"]
    assert settings.trusted_proxies == ["10.0.0.0/8", "192.168.1.7"]


def test_empty_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ALLOWED_ORIGINS", "")
    monkeypatch.setenv("TRUSTED_PROXIES", "")
    settings = Settings()
    assert settings.cors_allowed_origins == []
    assert settings.trusted_proxies == []


def test_default_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORS_ALLOWED_ORIGINS", raising=False)
    monkeypatch.delenv("TRUSTED_PROXIES", raising=False)
    settings = Settings()
    assert settings.cors_allowed_origins == []
    assert settings.trusted_proxies == ["127.0.0.1"]


# --- Documentation ----------------------------------------------------------------------------


def documented_in_readme() -> set[str]:
    text = (CONFIG / "README.md").read_text()
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", text, flags=re.MULTILINE))


def documented_in_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (CONFIG / "example.env").read_text().splitlines():
        found = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if found:
            values[found.group(1)] = found.group(2)
    return values


def test_every_setting_is_documented_in_the_config_readme() -> None:
    documented = documented_in_readme()
    assert FIELDS - documented == set(), "settings missing from config/README.md"
    assert documented - FIELDS == set(), "config/README.md documents settings that don't exist"


def test_every_setting_appears_in_the_example_env() -> None:
    example = documented_in_example()
    assert FIELDS - set(example) == set(), "settings missing from config/example.env"
    assert set(example) - FIELDS == set(), "config/example.env names settings that don't exist"


def test_example_values_are_valid() -> None:
    """Every concrete (non-placeholder) value in the example passes validation."""
    concrete = {
        name.lower(): value for name, value in documented_in_example().items() if "<" not in value
    }
    settings = Settings(**concrete)
    assert settings.database_statement_cache_size == 0
    assert settings.trusted_proxies == ["10.0.0.0/16"]


def test_empty_urls_and_secrets_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "DATABASE_URL",
        "MIGRATION_DATABASE_URL",
        "REDIS_URL",
        "SIGNING_KEYS",
        "ENCRYPTION_KEYS",
        "INTERNAL_SERVICE_TOKEN",
    ):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert settings.database_url is None
    assert settings.migration_database_url is None
    assert settings.redis_url is None
    assert settings.signing_keys is None
