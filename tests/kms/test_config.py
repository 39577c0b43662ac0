"""Where endpoint and credentials come from."""

from __future__ import annotations

import os
import pickle
import stat

import pytest

from ppml_kms.exceptions import ConfigError
from ppml_kms.kms.config import KmsConfig, read_credentials_file, write_credentials_file


def test_explicit_credentials_file_wins_over_environment(tmp_path, monkeypatch) -> None:
    creds = tmp_path / "creds"
    creds.write_text("PPML_KMS_URL=https://file:1/ehsm\nexport PPML_KMS_APPID='file-app'\nPPML_KMS_APIKEY=filekey # c\n")
    monkeypatch.setenv("PPML_KMS_APPID", "env-app")
    monkeypatch.setenv("PPML_KMS_APIKEY", "env-key")
    config = KmsConfig.load(credentials_file=str(creds))
    assert (config.url, config.appid, config.apikey) == ("https://file:1/ehsm", "file-app", "filekey")


def test_environment_wins_over_files_found_by_default(tmp_path, monkeypatch) -> None:
    creds = tmp_path / "creds"
    creds.write_text("PPML_KMS_APPID=file-app\nPPML_KMS_APIKEY=filekey\n")
    monkeypatch.setenv("PPML_KMS_CREDENTIALS", str(creds))
    monkeypatch.setenv("PPML_KMS_APPID", "env-app")
    monkeypatch.setenv("PPML_KMS_APIKEY", "env-key")
    assert KmsConfig.load().require_credentials() == ("env-app", "env-key")


def test_appid_and_apikey_never_mix_sources(tmp_path, monkeypatch) -> None:
    creds = tmp_path / "creds"
    creds.write_text("PPML_KMS_APPID=file-app\nPPML_KMS_APIKEY=filekey\n")
    monkeypatch.setenv("PPML_KMS_CREDENTIALS", str(creds))
    monkeypatch.setenv("APPID", "bigdl-app")  # half a pair in the environment
    assert KmsConfig.load().require_credentials() == ("file-app", "filekey")


def test_non_utf8_credentials_file(tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"PPML_KMS_APPID=\xff\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        read_credentials_file(bad)


def test_bigdl_variables_are_accepted(monkeypatch) -> None:
    monkeypatch.setenv("APPID", "bigdl-app")
    monkeypatch.setenv("APIKEY", "bigdl-key")
    config = KmsConfig.load(url="https://h:1")
    assert config.require_credentials() == ("bigdl-app", "bigdl-key")


def test_missing_settings_are_explained() -> None:
    config = KmsConfig.load()
    with pytest.raises(ConfigError, match="PPML_KMS_URL"):
        config.require_url()
    with pytest.raises(ConfigError, match="PPML_KMS_APPID"):
        config.require_credentials()


def test_default_credentials_file_location(tmp_path, monkeypatch) -> None:
    path = tmp_path / "xdg" / "ppml-kms" / "credentials"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    write_credentials_file(path, {"PPML_KMS_APPID": "a b", "PPML_KMS_APIKEY": "k'ey"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_credentials_file(path) == {"PPML_KMS_APPID": "a b", "PPML_KMS_APIKEY": "k'ey"}
    config = KmsConfig.load()
    assert config.appid == "a b" and config.credentials_file == str(path)
    with pytest.raises(ConfigError, match="already exists"):
        write_credentials_file(path, {"X": "y"})


def test_malformed_credentials_file(tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("this is not an assignment\n")
    with pytest.raises(ConfigError, match="line 1"):
        read_credentials_file(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        read_credentials_file(tmp_path / "missing")


def test_executor_copy_carries_no_secret_and_re_resolves(tmp_path) -> None:
    creds = tmp_path / "creds"
    write_credentials_file(creds, {"PPML_KMS_APPID": "app", "PPML_KMS_APIKEY": "secret-key"})
    config = KmsConfig(url="https://h:1/ehsm", appid="app", apikey="secret-key", credentials_file=str(creds))
    shipped = pickle.loads(pickle.dumps(config.without_secret()))
    assert b"secret-key" not in pickle.dumps(config.without_secret())
    assert "secret-key" not in repr(config)
    assert shipped.resolved().apikey == "secret-key"
