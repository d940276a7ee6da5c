"""Continuous batching in the llama.cpp engine: concurrent generations share each llama_decode,
with the same greedy outputs as decoded one sequence at a time."""

import asyncio

import pytest

from hera_core.backends.llamacpp import LlamaCppEngine, Occupancy
from tests.conftest import run

PROMPTS = [[{"role": "user", "content": f"Write two sentences about a {w}."}]
           for w in ("cat", "robot", "river", "baker", "comet", "violin")]


@pytest.fixture(scope="module")
def engines(tiny_model_path):
    made = {mode: LlamaCppEngine(tiny_model_path, n_ctx=1024, n_slots=8, n_threads=1, batching=mode == "batched")
            for mode in ("batched", "serial")}
    yield made
    for e in made.values():
        run(e.close())


def test_concurrent_generations_share_decodes_and_match_serial_outputs(engines):
    async def all_at_once(engine):
        return [g.text for g in await asyncio.gather(*[engine.generate(p, max_tokens=40) for p in PROMPTS])]

    serial = run(all_at_once(engines["serial"]))
    before = dict(engines["batched"].stats)
    batched = run(all_at_once(engines["batched"]))
    steps = engines["batched"].stats["decode_steps"] - before["decode_steps"]
    seqs = engines["batched"].stats["batched_sequences"] - before["batched_sequences"]
    assert batched == serial  # greedy, the same tokens (llama.cpp's arithmetic allowing: docs/performance.md, Continuous batching)
    assert seqs / steps > 3  # most decodes carried several sequences
    alone = [run(engines["batched"].generate(p, max_tokens=40)).text for p in PROMPTS[:2]]
    assert alone == serial[:2]


def test_a_generation_joins_a_running_batch_and_a_cancelled_one_leaves_it(engines):
    engine = engines["batched"]

    async def scenario():
        decoding = {name: asyncio.Event() for name in ("long", "doomed", "late")}  # its first text arrived
        long = asyncio.create_task(engine.generate(PROMPTS[0], max_tokens=60,
                                                   on_text=lambda _: decoding["long"].set()))
        doomed = asyncio.create_task(engine.generate(PROMPTS[1], max_tokens=200,
                                                     on_text=lambda _: decoding["doomed"].set()))
        await decoding["long"].wait()
        late = asyncio.create_task(engine.generate(PROMPTS[2], max_tokens=40,  # joins mid-way
                                                   on_text=lambda _: decoding["late"].set()))
        await decoding["late"].wait()
        assert decoding["doomed"].is_set() and not long.done() and not doomed.done()  # all three in the batch
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return (await long).text, (await late).text

    long_text, late_text = run(asyncio.wait_for(scenario(), 300))
    assert long_text == run(engine.generate(PROMPTS[0], max_tokens=60)).text
    assert late_text == run(engine.generate(PROMPTS[2], max_tokens=40)).text
    # every slot is free again: as many generations as slots run at once
    async def fill():
        return await asyncio.wait_for(asyncio.gather(*[engine.generate(PROMPTS[i % 6], max_tokens=4)
                                                       for i in range(8)]), 120)

    outs = run(fill())
    assert len(outs) == 8 and engine.occupancy().busy == 0


def test_streaming_deltas_of_batched_generations_reassemble_each_answer(engines):
    engine = engines["batched"]

    async def go():
        parts = [[] for _ in PROMPTS[:3]]
        gens = await asyncio.gather(*[engine.generate(p, max_tokens=30, on_text=parts[i].append)
                                      for i, p in enumerate(PROMPTS[:3])])
        return parts, gens

    parts, gens = run(go())
    assert ["".join(p) for p in parts] == [g.text for g in gens]


def test_n_samples_share_one_prompt_evaluation_and_decode_together(engines):
    """n samples: the prompt is evaluated once and its KV copied into n - 1 more sequences, which
    decode in the same batch; a seed makes them reproducible; a near-zero temperature gives the
    greedy answer in every sample."""
    engine = engines["batched"]
    prompt = [{"role": "user", "content": "Name a colour and say why you like it."}]
    before = dict(engine.stats)
    samples = run(engine.generate_samples(prompt, 4, max_tokens=24, temperature=1.0, seed=7))
    prompt_tokens = samples[0].prompt_tokens
    assert engine.stats["prefill_tokens"] - before["prefill_tokens"] <= prompt_tokens  # once, not 4 times
    assert engine.stats["seq_copies"] - before["seq_copies"] >= 3  # (+1 if the prompt linked a shared prefix)
    seqs = engine.stats["batched_sequences"] - before["batched_sequences"]
    steps = engine.stats["decode_steps"] - before["decode_steps"]
    assert seqs / steps > 2  # the samples shared decodes
    texts = [g.text for g in samples]
    assert len(set(texts)) > 1  # sampled, not four copies of one answer
    assert [g.text for g in run(engine.generate_samples(prompt, 4, max_tokens=24, seed=7))] == texts
    assert all(g.cached_tokens == prompt_tokens for g in samples[1:])
    greedy = run(engine.generate(prompt, max_tokens=24)).text
    cold = run(engine.generate_samples(prompt, 3, max_tokens=24, temperature=1e-4, seed=1))
    assert [g.text for g in cold] == [greedy] * 3


def test_bad_sampling_requests_are_refused_and_a_cancelled_one_frees_its_slots(engines):
    from hera_core.errors import InvalidRequestError

    engine = engines["batched"]
    prompt = [{"role": "user", "content": "Count to twenty."}]
    for kwargs in ({"n": 9}, {"n": 0}, {"n": 2, "temperature": 0.0}, {"n": 2, "top_p": 0.0}):
        with pytest.raises(InvalidRequestError):
            run(engine.generate_samples(prompt, **kwargs))

    async def cancel_midway():
        steps = engine.stats["decode_steps"]
        task = asyncio.create_task(engine.generate_samples(prompt, 6, max_tokens=200, seed=3))
        while engine.stats["decode_steps"] < steps + 2:  # the samples are decoding (not streamed: no text to wait on)
            await asyncio.sleep(0.001)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # every slot is free again: 8 at once still fit
        return await asyncio.wait_for(engine.generate_samples(prompt, 8, max_tokens=4, seed=3), 120)

    assert len(run(asyncio.wait_for(cancel_midway(), 300))) == 8
    assert engine.occupancy().busy == 0


def test_serial_engine_samples_too(engines):
    samples = run(engines["serial"].generate_samples(PROMPTS[0], 3, max_tokens=12, seed=5))
    batched = run(engines["batched"].generate_samples(PROMPTS[0], 3, max_tokens=12, seed=5))
    assert len(samples) == 3 and all(g.completion_tokens > 0 for g in samples)
    assert [g.text for g in samples] == [g.text for g in batched]  # same random streams, same tokens


def test_prefills_that_wait_together_are_evaluated_in_one_batch(engines, tiny_model_path):
    """Routing prefills queued behind a decode chunk are placed in their slots and evaluated
    together, in the next chunk's first llama_decode along with the generation's token; each gets its own
    last-position logits, as evaluated alone, and a generation of the same prompt continues
    from its slot without evaluating it again."""
    import numpy as np

    engine = engines["batched"]
    convs = [[{"role": "system", "content": f"You are helper number {i}."},
              {"role": "user", "content": f"Say something about the number {i * 7}."}] for i in range(6)]

    async def together():
        decoding = asyncio.Event()
        busy = asyncio.create_task(engine.generate(PROMPTS[0], max_tokens=40,  # a generation decoding
                                                   on_text=lambda _: decoding.set()))
        await decoding.wait()
        pres = await asyncio.gather(*[engine.prefill(c) for c in convs])
        await busy
        return pres

    before = dict(engine.stats)
    pres = run(together())
    assert engine.stats["prefill_batches"] > before["prefill_batches"]
    assert engine.stats["batched_prefills"] - before["batched_prefills"] >= 3
    assert engine.stats["prefills_with_decodes"] - before["prefills_with_decodes"] >= 3  # in the generation's decodes
    alone = LlamaCppEngine(tiny_model_path, n_ctx=1024, n_slots=2, n_threads=1, batching=False)
    try:
        for conv, pre in zip(convs, pres):
            ref = run(alone.prefill(conv))
            assert pre.prompt_tokens == ref.prompt_tokens
            assert int(np.argmax(pre.logits)) == int(np.argmax(ref.logits))
            np.testing.assert_allclose(pre.logits, ref.logits, atol=0.05)  # batch-shape rounding only
        gen = run(engine.generate(convs[3], max_tokens=16))
        assert gen.cached_tokens == gen.prompt_tokens  # continued from the batched prefill's slot
        assert gen.text == run(alone.generate(convs[3], max_tokens=16)).text
    finally:
        run(alone.close())


def test_a_bad_request_in_a_prefill_batch_fails_alone(engines):
    from hera_core.errors import ContextOverflowError

    engine = engines["batched"]
    too_long = [{"role": "user", "content": "word " * 2000}]

    async def together():
        return await asyncio.gather(engine.prefill(PROMPTS[1]), engine.prefill(too_long), engine.prefill(PROMPTS[2]),
                                    return_exceptions=True)

    first, bad, third = run(together())
    assert isinstance(bad, ContextOverflowError)
    assert first.prompt_tokens > 0 and third.prompt_tokens > 0


LONG_PROMPT = [{"role": "user", "content": "Summarize this list in one line: "
                + ", ".join(f"item {i}" for i in range(120))}]
COUNTING = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]


def test_a_long_prompt_is_evaluated_in_chunks_alongside_running_generations(engines, tiny_model_path):
    """A new generation's prompt joins the shared decode steps `prefill_chunk` tokens at a time,
    so a running generation keeps getting a token per step meanwhile; both answers are the ones
    decoded one sequence at a time."""
    eng = LlamaCppEngine(tiny_model_path, n_ctx=1024, n_slots=4, n_threads=1, prefill_chunk=16)

    async def go():
        decoding = asyncio.Event()
        a = asyncio.create_task(eng.generate(COUNTING, max_tokens=120, on_text=lambda _: decoding.set()))
        await decoding.wait()
        before = dict(eng.stats)
        b = await eng.generate(LONG_PROMPT, max_tokens=8)
        return await a, b, before

    try:
        a, b, before = run(go())
        chunks = eng.stats["prompts_with_decodes"] - before["prompts_with_decodes"]
        assert b.prompt_tokens > 300 and a.completion_tokens == 120
        assert chunks == -(-(b.prompt_tokens - b.cached_tokens) // 16)  # each chunk of B's prompt shared a step with A
        assert eng.occupancy() == Occupancy(busy=0, placing=0, waiting_prompts=0)
        eng.check_invariants()
    finally:
        run(eng.close())
    serial = engines["serial"]
    assert a.text == run(serial.generate(COUNTING, max_tokens=120)).text
    assert b.text == run(serial.generate(LONG_PROMPT, max_tokens=8)).text


def test_a_generation_cancelled_while_its_prompt_is_evaluated_frees_its_slot(tiny_model_path):
    eng = LlamaCppEngine(tiny_model_path, n_ctx=1024, n_slots=2, n_threads=1, prefill_chunk=8)

    async def go():
        decoding = asyncio.Event()
        a = asyncio.create_task(eng.generate(COUNTING, max_tokens=60, on_text=lambda _: decoding.set()))
        await decoding.wait()
        b = asyncio.create_task(eng.generate(LONG_PROMPT, max_tokens=8))
        while not eng.occupancy().waiting_prompts:  # B's prompt is being evaluated, 8 tokens a step
            await asyncio.sleep(0.001)
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        await a
        # both slots are free again and the engine still answers right
        return await asyncio.gather(eng.generate(LONG_PROMPT, max_tokens=8), eng.generate(PROMPTS[1], max_tokens=8))

    try:
        again, other = run(go())
        assert eng.occupancy() == Occupancy(busy=0, placing=0, waiting_prompts=0)
        eng.check_invariants()
    finally:
        run(eng.close())
    ref = LlamaCppEngine(tiny_model_path, n_ctx=1024, n_slots=2, n_threads=1, batching=False)
    try:
        assert again.text == run(ref.generate(LONG_PROMPT, max_tokens=8)).text
        assert other.text == run(ref.generate(PROMPTS[1], max_tokens=8)).text
    finally:
        run(ref.close())
