import pytest

from hera_core.config import load_settings
from hera_core.errors import ConfigError


def test_defaults_are_valid_and_pair_qwen_models():
    s = load_settings(env={})
    assert s.local.model == "qwen2.5-coder-0.5b" and s.cloud.model == "qwen2.5-coder-1.5b"
    assert s.cloud.base_url is None  # the demo starts cloud-sim itself


def test_environment_points_the_same_code_at_a_real_provider():
    s = load_settings(env={"HERA_CLOUD_BASE_URL": "https://api.example.test/v1",
                           "HERA_CLOUD_API_KEY": "sk-secret", "HERA_CLOUD_MODEL": "gpt-4o-mini"})
    assert s.cloud.base_url == "https://api.example.test/v1" and s.cloud.model == "gpt-4o-mini"
    assert "sk-secret" not in repr(s) and s.cloud.api_key.get_secret_value() == "sk-secret"


def test_bad_value_is_one_line_naming_the_field(tmp_path):
    cfg = tmp_path / "hera.toml"
    cfg.write_text("[cloud]\ntimeout_s = -1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    msg = str(err.value)
    assert "cloud.timeout_s" in msg and "\n" not in msg and str(cfg) in msg


def test_unknown_key_missing_file_and_broken_toml(tmp_path):
    cfg = tmp_path / "hera.toml"
    cfg.write_text("[local]\nthreads = 2\n")
    with pytest.raises(ConfigError, match="local.threads"):
        load_settings(cfg, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})
    cfg.write_text("[local\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg, env={})


def test_api_key_value_is_never_echoed_in_errors():
    with pytest.raises(ConfigError) as err:
        load_settings(overrides={"cloud.api_key": 12345, "cloud.nope": 1}, env={})
    assert "12345" not in str(err.value)


def test_prices_are_per_million_tokens_and_energy():
    p = load_settings(env={}).prices
    assert p.cloud_cost(1_000_000, 0) == pytest.approx(p.cloud_input_usd_per_mtok)
    assert p.cloud_cost(0, 2_000_000) == pytest.approx(2 * p.cloud_output_usd_per_mtok)
    assert p.local_cost(3600) == pytest.approx(p.local_watts / 1000 * p.local_usd_per_kwh)


def test_kv_budget_smaller_than_a_block_is_rejected_at_load():
    with pytest.raises(ConfigError, match="smaller than one block"):
        load_settings(overrides={"local.kv_budget_tokens": 8, "local.kv_block_tokens": 16}, env={})
    assert load_settings(overrides={"local.kv_budget_tokens": 16}, env={}).local.kv_budget_tokens == 16


def test_the_readme_configuration_example_loads(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = tmp_path / "hera.toml"
    cfg.write_text(block)
    s = load_settings(cfg, env={})
    assert s.server.budget_action == "local" and s.local.n_slots == 8 and s.cloud.fallback == "local"
