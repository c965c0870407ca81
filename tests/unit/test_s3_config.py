"""s3:// store URLs and the AWS shared config files, read without a server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotrestart.store import config, s3


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://ckpt", "ckpt", ""),
        ("s3://ckpt/", "ckpt", ""),
        ("s3://ckpt/cluster-a/store/", "ckpt", "cluster-a/store"),
        ("s3://my.bucket-1/x_y.z", "my.bucket-1", "x_y.z"),
    ],
)
def test_store_urls_name_a_bucket_and_a_prefix(url: str, bucket: str, prefix: str) -> None:
    loc = s3.Location.parse(url)
    assert (loc.bucket, loc.prefix) == (bucket, prefix)
    assert s3.Location.parse(loc.url) == loc


@pytest.mark.parametrize(
    "url",
    ["s3://", "s3://A", "s3://UPPER/x", "s3://b/../x", "s3://bkt/a//b", "s3://bkt/a/./b", "s3://bkt/a b", "gs://bkt"],
)
def test_bad_store_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        s3.Location.parse(url)


def test_only_s3_urls_and_directories_are_stores(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only s3://"):
        config.backend("gs://bucket/x", None)
    assert type(config.backend(str(tmp_path), None)).__name__ == "Store"


@pytest.fixture
def aws_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".aws").mkdir()
    return tmp_path


def test_the_shared_files_fill_what_the_environment_leaves_unset(
    aws_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (aws_home / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n[other]\naws_access_key_id = OK\n"
    )
    (aws_home / ".aws" / "config").write_text(
        "[default]\nregion = eu-west-3\nendpoint_url = http://rgw:7480\n[profile other]\nregion = us-east-2\n"
    )
    assert s3.shared_config() == {
        "access_key_id": "AK",
        "secret_access_key": "SK",
        "region": "eu-west-3",
        "endpoint": "http://rgw:7480",
    }
    monkeypatch.setenv("AWS_PROFILE", "other")
    assert s3.shared_config() == {"access_key_id": "OK", "region": "us-east-2"}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert s3.shared_config() == {}


def test_a_mounted_credentials_file_and_broken_files(aws_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = aws_home / "secret"
    secret.write_text("[default]\naws_access_key_id = S1\naws_secret_access_key = S2\naws_session_token = T\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(secret))
    (aws_home / ".aws" / "config").write_text("not an ini file [")
    assert s3.shared_config() == {"access_key_id": "S1", "secret_access_key": "S2", "session_token": "T"}


def test_the_request_timeout_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(s3.TIMEOUT_ENV, "0")
    assert s3.timeout() == 1.0
    monkeypatch.setenv(s3.TIMEOUT_ENV, "nonsense")
    assert s3.timeout() == s3.DEFAULT_TIMEOUT
    monkeypatch.setenv(s3.TIMEOUT_ENV, "1e9")
    assert s3.timeout() == 600.0


def test_the_runtime_config_file_sets_everything_before_the_environment(
    aws_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = aws_home / "s3-config"
    conf.write_text(
        "[default]\naws_access_key_id = A\naws_secret_access_key = S\nregion = r1\nendpoint_url = http://gw:80\n"
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_REGION", "from-env")
    assert s3.shared_config(str(conf)) == {
        "access_key_id": "A",
        "secret_access_key": "S",
        "region": "r1",
        "endpoint": "http://gw:80",
    }
    monkeypatch.setenv("AWS_PROFILE", "ci")
    conf.write_text("[profile ci]\nregion = r2\n")
    assert s3.shared_config(str(conf)) == {"region": "r2"}


def test_a_runtime_config_file_that_cannot_be_read_is_an_error(aws_home: Path) -> None:
    with pytest.raises(OSError, match="S3 config file"):
        s3.shared_config(str(aws_home / "missing"))
    (aws_home / "broken").write_text("[default\nx")
    with pytest.raises(OSError, match="S3 config file"):
        s3.shared_config(str(aws_home / "broken"))
    (aws_home / "link").symlink_to(aws_home / "broken")
    with pytest.raises(OSError, match="S3 config file"):
        s3.shared_config(str(aws_home / "link"))
    os.mkfifo(aws_home / "fifo")
    with pytest.raises(OSError, match="not a regular file"):
        s3.shared_config(str(aws_home / "fifo"))


def test_the_command_says_what_is_wrong_with_a_store_url(capsys: pytest.CaptureFixture[str]) -> None:
    from hotrestart.cli import main

    for url, said in (("gs://bucket/x", "only s3:// URLs"), ("s3://A/x", "not a bucket name")):
        with pytest.raises(SystemExit) as done:
            main(["--store", url, "ls"])
        assert done.value.code == 1 or said in str(done.value.code)
        assert said in capsys.readouterr().err + str(done.value.code)
