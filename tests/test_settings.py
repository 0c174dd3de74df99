from __future__ import annotations

import os
from pathlib import Path

import pytest

from estat.errors import ConfigError
from estat.settings import effective_config, load_settings, markdown_table, parse_duration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in ("HTTP_ADDR", "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "FLUSH_INTERVAL", "DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_the_seed_contract() -> None:
    s = load_settings()
    assert s.raw_prefix == "raw"
    assert s.dlq_prefix == "raw_dlq"
    assert s.listen == ("0.0.0.0", 8080)
    assert s.max_body_size == 16384
    assert s.channel_size == 4000
    assert s.upload_queue == 4
    assert s.batch_size == 5000
    assert s.flush_interval == 120
    assert s.s3_timeout == 3
    assert s.s3_app_retries == 2
    assert s.dlq_max_age == 24 * 3600
    assert s.dlq_max_size_bytes == 19327352832
    assert s.shutdown_timeout == 25
    assert s.partition_tz == "UTC"
    assert s.lake_path == Path("data/lake")
    assert s.dlq_path == Path("data/dlq")
    assert s.raw_bucket is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3s", 3), ("2m", 120), ("24h", 86400), ("250ms", 0.25), ("1d", 86400), ("7", 7)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_environment_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("BATCH_SIZE=77\nFLUSH_INTERVAL=2m\n")
    monkeypatch.setenv("FLUSH_INTERVAL", "5s")  # the environment wins over .env
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    s = load_settings()
    assert s.batch_size == 77
    assert s.flush_interval == 5
    assert s.s3_endpoint_url == "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FLUSH_INTERVAL", "soon"),
        ("BATCH_SIZE", "0"),
        ("HTTP_ADDR", "8080"),
        ("PARTITION_TZ", "Mars/Olympus"),
        ("S3_ENDPOINT_URL", "ftp://x"),
        ("LOG_LEVEL", "loud"),
        ("INSTANCE_ID", "has space"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as e:
        load_settings()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"invalid configuration: {name}=")
    assert "accepts" in msg


def test_effective_config_masks_secrets_by_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTH_JWT_SECRET", "s3cret-value")
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", "redis://:pw@127.0.0.1:6379/0")
    settings = load_settings()
    rows = dict(effective_config(settings))
    assert rows["FLUSH_INTERVAL"] == "2m"
    assert rows["LAKE_DIR"] == "data/lake"
    assert rows["AUTH_JWT_SECRET"] == "****"
    assert rows["RATE_LIMIT_REDIS_URL"] == "****"
    assert "s3cret-value" not in repr(settings)  # SecretStr, not a name heuristic
    assert settings.auth_jwt_secret is not None
    assert settings.auth_jwt_secret.get_secret_value() == "s3cret-value"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("HTTP_ADDR", ":99999", "port 99999 is out of range"),
        ("CORS_ALLOW_ORIGINS", "shop.example", "is not an origin"),
        ("CORS_ALLOW_ORIGINS", "https://shop.example, ftp://x", "is not an origin"),
        ("RAW_BUCKET", "My_Bucket", "not an S3 bucket name"),
        ("RAW_BUCKET", "192.168.0.1", "not an S3 bucket name"),
        (
            "AUTH_JWT_PUBLIC_KEY",
            "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----",
            "not a PEM public key",
        ),
    ],
)
def test_values_checked_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert says in str(e.value)
    assert list(e.value.problems) == [name]


def test_every_invalid_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    bad = {
        "HTTP_ADDR": ":99999",
        "CORS_ALLOW_ORIGINS": "shop.example",
        "RAW_BUCKET": "Bad_Bucket",
        "AUTH_JWT_PUBLIC_KEY": "not-a-key-and-secret",
        "BATCH_SIZE": "0",
    }
    for k, v in bad.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert set(e.value.problems) == set(bad)
    out = subprocess.run([sys.executable, "-m", "estat", "config"], capture_output=True, text=True)
    assert out.returncode == 2
    marked = {line.split()[0] for line in out.stdout.splitlines() if "<- INVALID" in line}
    assert marked == set(bad)
    assert "FLUSH_INTERVAL" in out.stdout  # the whole table, not only the errors
    assert "not-a-key-and-secret" not in out.stdout + out.stderr


def test_configuration_doc_is_current() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == markdown_table(), "docs/configuration.md is stale: run `make docs`"


def test_openapi_doc_is_current() -> None:
    from estat.ingest.openapi import render

    assert (ROOT / "docs" / "openapi.json").read_bytes() == render(), "run `make docs`"


def test_config_command_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    monkeypatch.setenv("AUTH_JWT_SECRET", "do-not-print-this-secret")
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", "redis://:pw@127.0.0.1:6379/0")
    out = subprocess.run(
        [sys.executable, "-m", "estat", "config"], capture_output=True, text=True, check=True
    )
    assert "do-not-print-this-secret" not in out.stdout
    assert ":pw@" not in out.stdout
    assert "AUTH_JWT_SECRET" in out.stdout
    assert "FLUSH_INTERVAL" in out.stdout


def test_an_injected_environment_is_the_only_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_SIZE", "7")  # the process's environment is not read
    s = load_settings({"BATCH_SIZE": "123", "FLUSH_INTERVAL": "3s"})
    assert s.batch_size == 123
    assert s.flush_interval == 3.0
    assert load_settings({}).batch_size == 5000
    with pytest.raises(ConfigError) as e:
        load_settings({"HTTP_ADDR": ":99999"})
    assert "HTTP_ADDR=':99999'" in str(e.value)
    assert load_settings().batch_size == 7  # and the process's again without one


def test_dispatch_targets_follow_the_destinations_configured() -> None:
    ph = {"POSTHOG_HOST": "https://eu.i.posthog.com", "POSTHOG_API_KEY": "phc_x"}
    hook = {"WEBHOOK_URL": "https://hooks.example.org/estat", "WEBHOOK_SECRET": "s"}
    assert load_settings({}).targets == ()
    assert load_settings(ph).targets == ("POSTHOG",)  # set up: dispatched to
    assert load_settings({**ph, **hook}).targets == ("POSTHOG", "WEBHOOK")
    assert load_settings({**ph, "DISPATCH_TARGETS": ""}).targets == ()  # explicitly none
    assert load_settings({**ph, **hook, "DISPATCH_TARGETS": "webhook"}).targets == ("WEBHOOK",)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"DISPATCH_TARGETS": "POSTHOG"}, "needs POSTHOG_HOST and POSTHOG_API_KEY"),
        ({"DISPATCH_TARGETS": "MIXPANEL"}, "unknown destination 'MIXPANEL'"),
        ({"WEBHOOK_URL": "https://h.example.org/x"}, "needs WEBHOOK_URL and WEBHOOK_SECRET"),
        # half a destination is not silently no destination
        ({"POSTHOG_HOST": "https://eu.i.posthog.com"}, "POSTHOG_API_KEY not set: POSTHOG needs"),
        ({"POSTHOG_API_KEY": "phc_x"}, "POSTHOG_HOST not set: POSTHOG needs"),
        ({"WEBHOOK_SECRET": "s"}, "WEBHOOK_URL not set: WEBHOOK needs"),
        ({"POSTHOG_HOST": "eu.i.posthog.com"}, "http:// or https://"),
        ({"DISPATCH_BATCH_SIZE": "1001"}, "1000"),
        ({"DISPATCH_RETRY_MAX_DELAY": "5s"}, "at least DISPATCH_RETRY_BASE_DELAY"),
        # the database would end every lease of a destination that slow
        ({"DISPATCH_READ_TIMEOUT": "30s"}, "raise DISPATCH_LEASE to at least 96s"),
        ({"DISPATCH_LANE_IN_FLIGHT": "1", "DISPATCH_LEASE": "45s"}, "at least 50s"),
    ],
)
def test_dispatch_settings_are_checked_at_start(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(env)
    assert says in str(e.value)


def test_a_check_across_variables_names_them_and_never_shows_a_secret(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {"POSTHOG_HOST": "https://eu.i.posthog.com", "POSTHOG_API_KEY": "phc_s3cr3t",
           "WEBHOOK_SECRET": "whsec_s3cr3t", "DISPATCH_TARGETS": "POSTHOG,WEBHOOK"}  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_settings(env)
    assert e.value.problems == {
        "DISPATCH_TARGETS": "DISPATCH_TARGETS=POSTHOG,WEBHOOK needs WEBHOOK_URL and WEBHOOK_SECRET"
    }
    run = subprocess.run(
        [sys.executable, "-m", "estat", "config"], env={**os.environ, **env},
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "s3cr3t" not in run.stdout + run.stderr
    marked = [line for line in run.stdout.splitlines() if "<- INVALID" in line]
    assert marked == [
        "DISPATCH_TARGETS                    POSTHOG,WEBHOOK   <- INVALID: "
        "DISPATCH_TARGETS=POSTHOG,WEBHOOK needs WEBHOOK_URL and WEBHOOK_SECRET"
    ]


def test_estat_dispatch_without_a_destination_says_what_to_set(tmp_path: Path) -> None:
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "estat", "dispatch"],
        env={**os.environ, "DATA_DIR": str(tmp_path), "ADMIN_ADDR": "off"},
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "POSTHOG_HOST" in run.stderr + run.stdout


@pytest.mark.parametrize(
    ("environ", "dotenv", "url"),
    [
        ({}, None, "http://127.0.0.1:8081"),
        ({}, "ADMIN_ADDR=10.0.0.5:9091\n", "http://10.0.0.5:9091"),
        ({}, "admin_addr=:9091\n", "http://127.0.0.1:9091"),
        ({"ADMIN_ADDR": "0.0.0.0:7000"}, "ADMIN_ADDR=10.0.0.5:9091\n", "http://127.0.0.1:7000"),
        ({"ADMIN_ADDR": "[::]:7000"}, None, "http://[::1]:7000"),
        ({"ADMIN_ADDR": "[fd00::1]:7000"}, None, "http://[fd00::1]:7000"),
        ({"ESTAT_ADMIN_URL": "https://ops.example/"}, "ADMIN_ADDR=:9091\n", "https://ops.example"),
        ({}, "ADMIN_ADDR=off\n", "http://127.0.0.1:8081"),
    ],
)
def test_estat_commands_find_the_admin_listener_where_the_server_reads_it(
    environ: dict[str, str], dotenv: str | None, url: str, tmp_path: Path
) -> None:
    from estat.settings.admin import admin_url

    if dotenv is not None:
        (tmp_path / ".env").write_text(dotenv)
    assert admin_url(environ, str(tmp_path / ".env")) == url


def test_the_database_is_opened_with_its_dead_peer_timeout() -> None:
    from estat.store.db import Database, pg_connect_args

    s = load_settings({"DATABASE_URL": "postgresql://u@db.example:5432/e",
                       "DATABASE_DEAD_PEER_TIMEOUT": "12s"})  # fmt: skip
    assert s.database_args == {
        "url": "postgresql://u@db.example:5432/e",
        "dead_peer_after": 12.0,
    }
    db = Database(**s.database_args)  # no connection is made here
    try:
        assert db.dead_peer_after == 12.0
        assert pg_connect_args(db.url, db.dead_peer_after)["keepalives_idle"] == 4
    finally:
        db.close()
    assert load_settings({}).database_dead_peer_timeout == 30.0
    with pytest.raises(ConfigError):
        load_settings({"DATABASE_DEAD_PEER_TIMEOUT": "1s"})
