"""CaptureConfig: override > environment > default, strict parsing, child round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ringwatch import _config
from ringwatch._config import CaptureConfig, ConfigError


def test_empty_environment_gives_the_defaults():
    assert CaptureConfig.from_env({}) == CaptureConfig()
    cfg = CaptureConfig()
    assert cfg.log_dir == Path(_config.DEFAULT_LOG_DIR)
    assert cfg.job_id is None and cfg.host is None


def test_environment_overrides_defaults():
    env = {
        _config.ENV_LOG_DIR: "/data/logs",
        _config.ENV_JOB_ID: "job-7",
        _config.ENV_HOST: "node-3",
        _config.ENV_FLUSH_INTERVAL_S: "0.5",
        _config.ENV_BUFFER_EVENTS: "123",
        _config.ENV_COMPACT_SEGMENTS: "4",
        _config.ENV_FR_BACKFILL_INTERVAL_S: "2.5",
        _config.ENV_DDP_HOOK: "0",
        _config.ENV_NCCL_HOOK: "false",
        _config.ENV_FR_BACKFILL: "no",
        _config.ENV_FR_DUMP: "off",
        _config.ENV_WRAP_BACKEND: "1",
        _config.ENV_AUTO_STEP: "0",
        _config.ENV_NATIVE: "1",
    }
    cfg = CaptureConfig.from_env(env)
    assert cfg == CaptureConfig(
        log_dir=Path("/data/logs"), job_id="job-7", host="node-3", flush_interval_s=0.5,
        buffer_events=123, compact_segments=4, fr_backfill_interval_s=2.5, ddp_hook=False,
        nccl_hook=False, fr_backfill=False, fr_dump=False, wrap_backend=True, auto_step=False,
        native=True)
    assert isinstance(cfg.buffer_events, int) and isinstance(cfg.flush_interval_s, float)


def test_override_beats_environment_and_none_is_ignored():
    env = {_config.ENV_BUFFER_EVENTS: "10", _config.ENV_JOB_ID: "from-env",
           _config.ENV_DDP_HOOK: "0"}
    cfg = CaptureConfig.from_env(env, buffer_events=20, job_id=None, ddp_hook=True)
    assert cfg.buffer_events == 20  # override > env
    assert cfg.job_id == "from-env"  # None override: env stays
    assert cfg.ddp_hook is True
    assert CaptureConfig.from_env(env, ddp_hook=None).ddp_hook is False


def test_override_log_dir_string_becomes_a_path():
    cfg = CaptureConfig.from_env({_config.ENV_LOG_DIR: "/env"}, log_dir="/flag")
    assert cfg.log_dir == Path("/flag")
    assert isinstance(cfg.log_dir, Path)


def test_default_environment_is_os_environ(monkeypatch):
    for name in list(_config.__dict__):
        if name.startswith("ENV_"):
            monkeypatch.delenv(getattr(_config, name), raising=False)
    monkeypatch.setenv(_config.ENV_COMPACT_SEGMENTS, "9")
    assert CaptureConfig.from_env().compact_segments == 9


def test_empty_numeric_or_text_variable_means_unset():
    env = {_config.ENV_FLUSH_INTERVAL_S: "", _config.ENV_JOB_ID: "", _config.ENV_LOG_DIR: ""}
    assert CaptureConfig.from_env(env) == CaptureConfig()


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", " 1 "])
def test_bool_true_spellings(value):
    assert CaptureConfig.from_env({_config.ENV_WRAP_BACKEND: value}).wrap_backend is True


@pytest.mark.parametrize("value", ["0", "false", "No", "off"])
def test_bool_false_spellings(value):
    assert CaptureConfig.from_env({_config.ENV_DDP_HOOK: value}).ddp_hook is False


@pytest.mark.parametrize("value", ["2", "maybe", "enabled", "-1"])
def test_bad_bool_raises_config_error_naming_the_variable(value):
    with pytest.raises(ConfigError, match=_config.ENV_NCCL_HOOK):
        CaptureConfig.from_env({_config.ENV_NCCL_HOOK: value})


@pytest.mark.parametrize(("name", "value"), [
    (_config.ENV_FLUSH_INTERVAL_S, "abc"),
    (_config.ENV_FLUSH_INTERVAL_S, "0"),
    (_config.ENV_FLUSH_INTERVAL_S, "-1.5"),
    (_config.ENV_BUFFER_EVENTS, "1.5"),
    (_config.ENV_BUFFER_EVENTS, "0"),
    (_config.ENV_BUFFER_EVENTS, "lots"),
    (_config.ENV_COMPACT_SEGMENTS, "-3"),
    (_config.ENV_FR_BACKFILL_INTERVAL_S, "0"),
])
def test_bad_positive_number_raises_config_error(name, value):
    with pytest.raises(ConfigError, match=name):
        CaptureConfig.from_env({name: value})


@pytest.mark.parametrize("override", [
    {"flush_interval_s": 0}, {"buffer_events": -1}, {"compact_segments": 0},
])
def test_non_positive_override_raises(override):
    with pytest.raises(ConfigError):
        CaptureConfig.from_env({}, **override)


def test_unknown_override_raises_and_names_it():
    with pytest.raises(ConfigError, match="bogus_option"):
        CaptureConfig.from_env({}, bogus_option=1)
    # ... even when another, valid, option is given too.
    with pytest.raises(ConfigError, match="typo"):
        CaptureConfig.from_env({}, job_id="x", typo=True)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_config_is_frozen():
    cfg = CaptureConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.job_id = "x"  # type: ignore[misc]


def test_to_env_round_trip_defaults():
    cfg = CaptureConfig()
    env = cfg.to_env()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert _config.ENV_JOB_ID not in env and _config.ENV_HOST not in env
    assert CaptureConfig.from_env(env) == cfg


def test_to_env_round_trip_every_field_changed():
    cfg = CaptureConfig(
        log_dir=Path("/tmp/rw logs/x"), job_id="job 1", host="gpu-node-17",
        flush_interval_s=0.1 + 0.2, buffer_events=7, compact_segments=3, ddp_hook=False,
        nccl_hook=False, fr_backfill=False, fr_backfill_interval_s=1e-3, fr_dump=False,
        wrap_backend=True, auto_step=False, native=True)
    for f in dataclasses.fields(CaptureConfig):
        assert getattr(cfg, f.name) != f.default, f"{f.name} left at its default"
    back = CaptureConfig.from_env(cfg.to_env())
    assert back == cfg
    assert back.flush_interval_s == 0.1 + 0.2  # floats survive exactly


def test_to_env_covers_every_field():
    env = CaptureConfig(job_id="j", host="h").to_env()
    env_names = {getattr(_config, n) for n in dir(_config) if n.startswith("ENV_")}
    assert set(env) <= env_names
    # Every field has its variable in the child's environment.
    assert len(env) == len(dataclasses.fields(CaptureConfig))


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:9410", ("127.0.0.1", 9410)), ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("node-7:4318", ("node-7", 4318)), ("[::1]:9410", ("::1", 9410)),
    ("[::]:4317", ("::", 4317)), (":9400", ("127.0.0.1", 9400)), ("9400", ("127.0.0.1", 9400)),
    (" localhost:65535 ", ("localhost", 65535)),
])
def test_parse_listen_reads_every_form(text, want):
    from ringwatch._net import join_host_port, parse_listen

    assert parse_listen(text) == want
    assert parse_listen(join_host_port(*want)) == want


@pytest.mark.parametrize("text", ["localhost", "host:", "host:http", "host:65536",
                                  "host:-1", "::1:9410", "[::1]9410", "[::1]", "[]:1",
                                  "host:123456", "host:1e3"])
def test_parse_listen_refuses_a_bad_port_in_one_line(text):
    from ringwatch._net import parse_listen

    with pytest.raises(ConfigError) as err:
        parse_listen(text)
    assert "\n" not in str(err.value) and repr(text) in str(err.value)


def test_agent_defaults_to_loopback_and_reads_its_token_from_a_file_or_the_env(tmp_path):
    from ringwatch._config import AgentConfig

    cfg = AgentConfig.from_env({})
    assert cfg.prometheus_listen == "127.0.0.1:9400" and cfg.token is None
    assert AgentConfig.from_env({_config.ENV_AGENT_TOKEN: "t-env"}).token == "t-env"
    f = tmp_path / "agent-token"
    f.write_text("t-file\n")
    env = {_config.ENV_AGENT_TOKEN: "t-env", _config.ENV_AGENT_TOKEN_FILE: str(f)}
    cfg = AgentConfig.from_env(env)
    assert cfg.token == "t-file" and "t-file" not in repr(cfg)
    flag = tmp_path / "flag-token"
    flag.write_text("t-flag")
    assert AgentConfig.from_env(env, token_file=flag).token == "t-flag"
    with pytest.raises(ConfigError, match="cannot read the token file"):
        AgentConfig.from_env({}, token_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match="IPv6 host in brackets"):
        AgentConfig.from_env({}, prometheus_listen="::1:9400")
