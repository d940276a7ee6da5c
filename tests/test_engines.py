import numpy as np
import pytest

from hera_core.backends.cloud import CloudEngine
from hera_core.errors import CloudError, CloudUnavailableError, ContextOverflowError, InvalidRequestError
from hera_core.serving.assembly import free_port
from tests.conftest import TINY, run

Q = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_local_engine_generates_greedily_and_reproducibly(tiny_engine):
    a = run(tiny_engine.generate(Q, max_tokens=16))
    b = run(tiny_engine.generate(Q, max_tokens=16))
    assert a.text.strip() and a.text == b.text
    assert 0 < a.completion_tokens <= 16 and a.prompt_tokens > 10
    assert a.finish_reason in ("stop", "length") and a.ttft_s <= a.latency_s
    assert "paris" in a.text.lower()


def test_prefill_returns_last_position_logits_and_decode_continues_from_it(tiny_engine):
    pre = run(tiny_engine.prefill(Q))
    assert pre.logits.shape == (tiny_engine.n_vocab,) and pre.logits.dtype == np.float32
    before = dict(tiny_engine.stats)
    gen = run(tiny_engine.generate(Q, max_tokens=1))
    # The same prompt right after its prefill evaluates no prompt token again.
    assert tiny_engine.stats["prefill_tokens"] == before["prefill_tokens"]
    assert gen.cached_tokens == pre.prompt_tokens
    first = tiny_engine.detokenize([int(np.argmax(pre.logits))])
    assert gen.text == first or gen.finish_reason == "stop"


def test_next_step_of_a_session_prefills_only_new_tokens(tiny_engine):
    g = run(tiny_engine.generate(Q, max_tokens=8))
    step2 = Q + [{"role": "assistant", "content": g.text}, {"role": "user", "content": "And of Italy?"}]
    pre = run(tiny_engine.prefill(step2))
    assert pre.cached_tokens >= len(tiny_engine.tokenize_messages(Q))
    assert pre.cached_tokens < pre.prompt_tokens


def test_stop_strings_cut_the_output(tiny_engine):
    msgs = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = run(tiny_engine.generate(msgs, max_tokens=40))
    assert "3" in full.text
    cut = run(tiny_engine.generate(msgs, max_tokens=40, stop=["3"]))
    assert "3" not in cut.text and cut.finish_reason == "stop"


def test_prompt_longer_than_context_is_refused_before_work(tiny_engine):
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(ContextOverflowError, match="context window"):
        run(tiny_engine.prefill(long))


def test_bad_requests_to_the_local_engine(tiny_engine):
    with pytest.raises(InvalidRequestError):
        run(tiny_engine.generate([], max_tokens=4))
    with pytest.raises(InvalidRequestError):
        run(tiny_engine.generate(Q, max_tokens=0))


def test_cloud_engine_talks_to_the_real_stand_in_over_http(cloud_url, tiny_engine):
    async def go():
        async with CloudEngine(cloud_url, TINY, api_key="sk-test") as cloud:
            return await cloud.generate(Q, max_tokens=16)

    gen = run(go())
    local = run(tiny_engine.generate(Q, max_tokens=16))
    assert gen.text == local.text  # same model, greedy: the HTTP path changes nothing
    assert gen.prompt_tokens == local.prompt_tokens and gen.completion_tokens == local.completion_tokens
    assert gen.latency_s > 0


def test_unreachable_cloud_is_one_line_naming_the_fix():
    async def go():
        async with CloudEngine(f"http://127.0.0.1:{free_port()}/v1", "m", timeout_s=5, max_retries=1) as cloud:
            await cloud.generate(Q, max_tokens=4)

    with pytest.raises(CloudUnavailableError) as err:
        run(go())
    assert "\n" not in str(err.value) and "HERA_CLOUD_BASE_URL" in str(err.value)


def test_cloud_client_error_is_not_retried_and_reports_status(cloud_url):
    async def go():
        async with CloudEngine(cloud_url, TINY) as cloud:
            return await cloud.chat({"model": TINY, "messages": []})

    with pytest.raises(CloudError, match="HTTP 400"):
        run(go())
