"""Configuration: defaults, TOML file, environment precedence, and errors that name the key."""
import pytest

from aimass.core.config import Config, ConfigError, describe, load_config


def test_defaults_run_the_embedded_stack():
    cfg = load_config(env={})
    assert cfg.kafka.bootstrap == "127.0.0.1:9092"
    assert cfg.mqtt.port == 1883
    assert cfg.clickhouse.url == ""  # embedded chDB
    assert cfg.window.sizes() == [10, 60]


def test_environment_wins_over_file(tmp_path):
    f = tmp_path / "aimass.toml"
    f.write_text('[kafka]\nbootstrap = "file:1"\npartitions = 3\n[mqtt]\nport = 1999\n')
    cfg = load_config(f, env={"AIMASS_KAFKA_BOOTSTRAP": "env:2", "AIMASS_BRIDGE_FLUSH_MS": "20"})
    assert cfg.kafka.bootstrap == "env:2"
    assert cfg.kafka.partitions == 3
    assert cfg.mqtt.port == 1999
    assert cfg.bridge.flush_ms == 20


def test_config_file_from_environment_variable(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[kafka]\npartitions = 2\n")
    assert load_config(env={"AIMASS_CONFIG": str(f)}).kafka.partitions == 2


@pytest.mark.parametrize("env, key, accepted", [
    ({"AIMASS_MQTT_PORT": "abc"}, "mqtt.port", "an integer"),
    ({"AIMASS_MQTT_PORT": "70000"}, "mqtt.port", "1..65535"),
    ({"AIMASS_KAFKA_SECURITY_PROTOCOL": "TLS"}, "kafka.security_protocol", "PLAINTEXT, SSL"),
    ({"AIMASS_MQTT_TLS": "maybe"}, "mqtt.tls", "true/false"),
    ({"AIMASS_MQTT_QOS": "2"}, "mqtt.qos", "0, 1"),
])
def test_bad_value_names_key_and_accepted_values(env, key, accepted):
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert key in str(err.value) and accepted in str(err.value)


def test_unknown_keys_and_sections_in_file_are_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[kafka]\nbootstrapp = 'x'\n")
    with pytest.raises(ConfigError, match="kafka.bootstrapp.*accepted: .*bootstrap"):
        load_config(f, env={})
    f.write_text("[kafkaa]\nbootstrap = 'x'\n")
    with pytest.raises(ConfigError, match="unknown config section 'kafkaa'"):
        load_config(f, env={})


def test_secrets_are_refused_in_files(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[mqtt]\npassword = 'hunter2'\n")
    with pytest.raises(ConfigError, match="environment only") as err:
        load_config(f, env={})
    assert "hunter2" not in str(err.value)


def test_missing_file_and_bad_toml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
    f = tmp_path / "bad.toml"
    f.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(f, env={})


def test_secret_reads_environment(monkeypatch):
    monkeypatch.setenv("AIMASS_MQTT_PASSWORD", "s3cret")
    assert Config.secret(load_config(env={}).mqtt.password_env) == "s3cret"


def test_describe_lists_every_key_with_its_env_name():
    rows = {r[0]: r for r in describe()}
    assert rows["kafka.bootstrap"][1] == "AIMASS_KAFKA_BOOTSTRAP"
    assert rows["mqtt.port"][3] == "1..65535"


def test_to_env_round_trips_every_key(tmp_path):
    from aimass.core.config import to_env
    cfg = load_config(env={"AIMASS_KAFKA_PARTITIONS": "3", "AIMASS_MQTT_TLS": "true", "AIMASS_RUN_DIR": str(tmp_path)})
    again = load_config(env=to_env(cfg))
    assert again == cfg


def test_triton_address_follows_the_grpc_port_unless_a_url_is_set():
    from aimass.core.config import to_env
    cfg = load_config(env={"AIMASS_TRITON_GRPC_PORT": "9123"})   # the demo / a backtest on free ports
    assert cfg.triton.grpc_address() == "127.0.0.1:9123"
    assert load_config(env=to_env(cfg)).triton.grpc_address() == "127.0.0.1:9123"   # as the demo's stages read it
    remote = load_config(env={"AIMASS_TRITON_GRPC_PORT": "9123", "AIMASS_TRITON_URL": "triton:8001"})
    assert remote.triton.grpc_address() == "triton:8001"   # a cluster's Triton service


def test_readme_configuration_reference_is_current():
    from pathlib import Path

    from aimass.core.config import reference_markdown
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate the README table: python -c " \
        "'from aimass.core.config import reference_markdown; print(reference_markdown())'"
