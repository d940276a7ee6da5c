"""Engines built from their settings (#29 item 4): the bounds of every option are written once, in
hera_core.config, and checked there, for the settings file and for keyword arguments alike."""

import asyncio

import pytest

from hera_core.backends.cloud import CloudEngine
from hera_core.backends.llamacpp import LlamaCppEngine
from hera_core.config import LlamaCppOptions, LocalSettings, TensorRTOptions, load_settings
from hera_core.errors import ConfigError, InvalidRequestError
from tests.conftest import TINY

SHARED = ["n_ctx", "n_threads", "n_threads_batch", "n_slots", "kv_budget_tokens", "n_gpu_layers", "decode_chunk",
          "prefill_chunk"]


@pytest.mark.parametrize("field", SHARED)
def test_the_engine_options_and_the_settings_have_the_same_bounds(field):
    assert LlamaCppOptions.model_fields[field].metadata == LocalSettings.model_fields[field].metadata
    assert LlamaCppOptions.model_fields[field].metadata  # a bound there is to share
    assert (LlamaCppOptions.model_fields["block_size"].metadata
            == LocalSettings.model_fields["kv_block_tokens"].metadata)
    assert TensorRTOptions.model_fields["n_ctx"].metadata == LocalSettings.model_fields["n_ctx"].metadata


@pytest.mark.parametrize("kwargs, field", [({"n_ctx": 255}, "n_ctx"), ({"n_slots": 65}, "n_slots"),
                                           ({"decode_chunk": -1}, "decode_chunk"), ({"n_bach": 8}, "n_bach"),
                                           ({"tool_grammar": "xgrammar"}, "tool_grammar")])
def test_a_bad_keyword_option_is_refused_by_name_before_the_model_loads(kwargs, field):
    with pytest.raises(InvalidRequestError, match=f"^{field}: "):
        LlamaCppEngine("/nonexistent/model.gguf", **kwargs)  # no file: only the check can have refused it


def test_the_settings_refuse_what_the_engine_refuses():
    with pytest.raises(ConfigError, match="local.n_ctx"):
        load_settings(overrides={"local.n_ctx": 255}, env={})
    load_settings(overrides={"local.n_ctx": 256}, env={})
    LlamaCppOptions.of(n_ctx=256)


def test_options_and_keywords_do_not_mix():
    with pytest.raises(TypeError):
        LlamaCppEngine("/nonexistent/model.gguf", options=LlamaCppOptions(), n_ctx=512)


def test_the_local_engine_from_settings(tiny_model_path, tmp_cache):
    settings = load_settings(overrides={"local.model": str(tiny_model_path), "local.n_ctx": 512,
                                        "local.n_slots": 2, "local.kv_block_tokens": 8, "local.decode_chunk": 4,
                                        "local.tool_grammar": "llguidance"}, env={})
    engine = LlamaCppEngine.from_settings(settings)
    try:
        assert engine.options == LlamaCppOptions(n_ctx=512, n_slots=2, block_size=8, decode_chunk=4,
                                                 tool_grammar="llguidance")
        assert engine.name == str(tiny_model_path) and engine.n_ctx == 512 and engine.kv_cells == 2 * 512
        gen = asyncio.run(engine.generate([{"role": "user", "content": "Hi"}], max_tokens=2))
        assert gen.completion_tokens >= 1
    finally:
        asyncio.run(engine.close())


def test_the_cloud_engine_from_settings():
    settings = load_settings(overrides={"cloud.base_url": "http://127.0.0.1:9/v1", "cloud.model": "m",
                                        "cloud.api_key": "k", "cloud.timeout_s": 7, "cloud.max_retries": 0,
                                        "cloud.breaker_failures": 3, "cloud.breaker_reset_s": 2.5}, env={})
    engine = CloudEngine.from_settings(settings)
    assert (engine.base_url, engine.name, engine.timeout_s, engine.max_retries) == ("http://127.0.0.1:9/v1", "m", 7, 0)
    assert (engine.breaker.failure_threshold, engine.breaker.reset_timeout_s) == (3, 2.5)
    assert CloudEngine.from_settings(settings, base_url="http://127.0.0.1:8/v1").base_url == "http://127.0.0.1:8/v1"
    with pytest.raises(ConfigError, match="base_url"):
        CloudEngine.from_settings(load_settings(env={}))
