"""GPU deployment: the TensorRT-LLM engine, GPU scoring of a batch, the engines/ material.

Runs everywhere: the TensorRT-LLM engine's error when its package is missing, the manifest doc
against its generator, the config blocks of the engines/ docs, the host-side checks of
hera_core.gpu.scoring and its CPU reference against XGBoost.

Marked gpu, skipped cleanly without a CUDA device (hera_core.native.cuda_available()): the CUDA
kernels on device arrays against the CPU reference, the device forest against XGBoost, the
scoring batch on the GPU against the CPU path; and, where tensorrt_llm is installed and
HERA_TRT_MODEL names a Hugging Face checkpoint of an instruct model, the TensorRT-LLM engine.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from hera_core import native
from hera_core.config import LocalSettings, load_settings
from hera_core.errors import ConfigError, HeraError, InvalidRequestError
from hera_core.native.features import logit_features, logit_features_numpy
from hera_core.native.forest import Forest
from hera_core.gpu.scoring import (device_matrix, score_batch_cpu, score_batch_device,
                                   structure_matrix)
from hera_core.routing.predictor import FEATURE_NAMES, STRUCTURE_FEATURE_NAMES, Predictor, feature_matrix
from tests.factories import device_array_module, to_device

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ROOT / "engines"
RTOL, ATOL = 1e-5, 1e-6
N_STRUCT = len(STRUCTURE_FEATURE_NAMES)


# ---------------------------------------------------------------------------------------------
# Factories


def random_logits(batch: int, vocab: int, *, seed: int = 0, masked: float = 0.05) -> np.ndarray:
    """float32 [batch, vocab] logits, a `masked` share -inf (column 0 always possible)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, vocab)) * 4).astype(np.float32)
    x[rng.random(x.shape) < masked] = -np.inf
    x[:, 0] = 1.0
    return x


def random_structure(batch: int, *, seed: int = 1) -> np.ndarray:
    """Structure rows in predictor order: step index, prompt tokens, messages, last message chars,
    the tool features (tools offered, call forced, tool results, after a result, its error), then
    the answer schema's size."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, 8, batch), rng.integers(20, 4000, batch), rng.integers(1, 17, batch),
                     rng.integers(0, 3000, batch), rng.integers(0, 5, batch), rng.integers(0, 2, batch),
                     rng.integers(0, 4, batch), rng.integers(0, 2, batch), rng.integers(0, 2, batch),
                     rng.integers(0, 12, batch)],
                    axis=1).astype(np.float32)


def trained_booster(trees: int = 40, depth: int = 5) -> xgb.Booster:
    """XGBoost on the predictor's feature columns, labels tied to the logit features (not random,
    so the trees split on every kind of column)."""
    rng = np.random.default_rng(7)
    feats = logit_features_numpy(random_logits(600, 257, seed=3, masked=0.0))
    X = feature_matrix(feats, random_structure(600, seed=4))
    y = ((X[:, 1] + 0.01 * X[:, 3] + rng.normal(scale=0.2, size=600)) > np.median(X[:, 1])).astype(np.float32)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": depth, "nthread": 1},
                        xgb.DMatrix(X, label=y), trees)
    booster.set_param({"nthread": 1})
    return booster


class CudaArrayInterface:
    """Carries only a `__cuda_array_interface__` dict: input for the validator, never launched."""

    def __init__(self, shape, typestr="<f4", strides=None, ptr=0x7F0000000000) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "strides": strides,
                                         "data": (ptr, False), "version": 3}


# ---------------------------------------------------------------------------------------------
# TensorRT-LLM engine without the package


def test_tensorrt_engine_without_the_package_is_a_one_line_config_error(monkeypatch) -> None:
    from hera_core.backends.tensorrt import TensorRTLLMEngine

    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # absent, also where it is installed
    with pytest.raises(ConfigError) as err:
        TensorRTLLMEngine("/models/qwen2.5-coder-0.5b-instruct")
    msg = str(err.value)
    assert "\n" not in msg
    assert "tensorrt_llm package" in msg and "pip install tensorrt-llm" in msg and 'local.engine = "llamacpp"' in msg
    assert isinstance(err.value, HeraError) and err.value.http_status == 400


def test_tensorrt_engine_checks_its_arguments_first() -> None:
    from hera_core.backends.tensorrt import TensorRTLLMEngine

    for kwargs in ({"n_ctx": 8}, {"max_batch_size": 0}, {"free_gpu_memory_fraction": 0.0},
                   {"tokens_per_block": 0}, {"logits_source": "hidden"}, {"backend": "onnx"},
                   {"tokens_per_block": 32, "hot_prefix_tokens": 16}):
        with pytest.raises(InvalidRequestError):
            TensorRTLLMEngine("/models/x", **kwargs)


def test_tensorrt_reused_tokens_come_from_its_metrics_else_the_hot_prefix_index() -> None:
    """Routing signal of the TensorRT-LLM engine (logic only; the engine itself needs a GPU)."""
    from types import SimpleNamespace

    from hera_core.backends.tensorrt import reused_tokens

    def out(metrics, **fields):
        return SimpleNamespace(outputs=[SimpleNamespace(request_perf_metrics=metrics)], **fields)

    with_metrics = out(SimpleNamespace(kv_cache_metrics=SimpleNamespace(num_reused_blocks=3)))
    assert reused_tokens(with_metrics, 500, 64, 32) == 96  # TensorRT-LLM's block count wins
    assert reused_tokens(with_metrics, 50, 64, 32) == 49  # the last prompt token is always computed
    assert reused_tokens(out(None), 500, 64, 32) == 64  # no metrics: the index's estimate
    assert reused_tokens(out(None), 40, 64, 32) == 39
    exact = out(SimpleNamespace(kv_cache_metrics=SimpleNamespace(num_reused_blocks=3)), cached_tokens=90)
    assert reused_tokens(exact, 500, 64, 32) == 90  # the exact count of newer releases wins


def test_tensorrt_requests_stop_on_the_checkpoints_end_of_turn_tokens(tmp_path) -> None:
    """generation_config.json's eos ids become stop_token_ids (logic only; the engine needs a GPU)."""
    from hera_core.backends.tensorrt import generation_eos_ids, sampling_fields

    pytest.importorskip("transformers")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [128001, 128009]}')
    assert generation_eos_ids(str(tmp_path)) == [128001, 128009]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 151645}')
    assert generation_eos_ids(str(tmp_path)) == [151645]
    assert generation_eos_ids(str(tmp_path / "absent")) == []

    accepted = frozenset({"max_tokens", "temperature", "top_k", "stop", "stop_token_ids"})
    params = sampling_fields(max_tokens=8, stop=["\n\n"], scoring=False, stop_token_ids=[128009], accepted=accepted,
                             logits_source="generation", token_logprobs=False)
    assert params == {"max_tokens": 8, "temperature": 0.0, "top_k": 1, "stop": ["\n\n"], "stop_token_ids": [128009]}
    older = sampling_fields(max_tokens=8, stop=None, scoring=True, stop_token_ids=[128009],
                            accepted=frozenset({"max_tokens"}), logits_source="context", token_logprobs=True)
    assert older == {"max_tokens": 8, "temperature": 0.0, "top_k": 1, "return_context_logits": True}



def test_importing_the_gpu_modules_loads_no_gpu_library() -> None:
    code = ("import sys, hera_core.backends.tensorrt, hera_core.gpu.scoring; "
            "print(sorted(m for m in ('tensorrt_llm', 'torch', 'cupy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# engines/ material


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_manifest", ENGINES / "gen_manifest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_models_md_is_the_generator_output() -> None:
    """engines/models.md is generated from hera_core.install.models; regenerate it after a manifest change:
    python engines/gen_manifest.py > engines/models.md"""
    assert (ENGINES / "models.md").read_text() == _load_generator().render()


def test_manifest_doc_lists_every_model_and_checksum() -> None:
    from hera_core.install.models import MODELS

    text = _load_generator().render()
    for spec in MODELS.values():
        assert f"`{spec.name}`" in text and spec.sha256 in text and f"{spec.size:,}" in text
        assert spec.parts[0].package in text and spec.parts[-1].package in text


def test_gpu_check_script_parses_and_names_its_modes() -> None:
    """engines/gpu_check.sh (the one-run GPU check) is valid bash and says how to call it."""
    script = ENGINES / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "wheels | run" in usage.stderr


def _toml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in sorted(ENGINES.glob("*.md")):
        for i, block in enumerate(re.findall(r"```toml\n(.*?)```", doc.read_text(), flags=re.S)):
            blocks.append((f"{doc.name}#{i}", block))
    return blocks


def test_engine_docs_hold_config_blocks() -> None:
    names = {name.split("#")[0] for name, _ in _toml_blocks()}
    assert {"jetson.md", "tensorrt-llm.md"} <= names


@pytest.mark.parametrize("name,block", _toml_blocks(), ids=[n for n, _ in _toml_blocks()])
def test_engine_doc_configs_are_valid_settings(tmp_path, name: str, block: str) -> None:
    """Each TOML block of engines/*.md loads with the real settings schema."""
    missing = {"engine", "n_gpu_layers"} - set(LocalSettings.model_fields)
    if missing:
        pytest.skip(f"LocalSettings has no {sorted(missing)} yet (the engine selection of issue 8)")
    path = tmp_path / "hera.toml"
    path.write_text(block)
    settings = load_settings(path, env={})
    assert settings.local.engine in ("llamacpp", "tensorrt")


# ---------------------------------------------------------------------------------------------
# gpu_scoring: host-side checks and the CPU reference


def test_device_matrix_refuses_host_arrays() -> None:
    with pytest.raises(ValueError, match="CUDA device array.*score_batch_cpu"):
        device_matrix(random_logits(2, 10))


def test_device_matrix_reads_the_cuda_array_interface() -> None:
    m = device_matrix(CudaArrayInterface((3, 151936)))
    assert (m.rows, m.cols, m.ptr) == (3, 151936, 0x7F0000000000)
    assert device_matrix(CudaArrayInterface((3, 5), strides=(20, 4))).cols == 5
    assert device_matrix(CudaArrayInterface((1, 5), strides=(999, 4))).rows == 1  # a moot row stride
    with pytest.raises(ValueError, match="float32"):
        device_matrix(CudaArrayInterface((3, 5), typestr="<f2"))
    with pytest.raises(ValueError, match="2-D"):
        device_matrix(CudaArrayInterface((15,)))
    with pytest.raises(ValueError, match="C-contiguous"):
        device_matrix(CudaArrayInterface((3, 5), strides=(40, 8)))  # every other column
    with pytest.raises(ValueError, match="at least one column"):
        device_matrix(CudaArrayInterface((3, 0)))
    with pytest.raises(ValueError, match="null"):
        device_matrix(CudaArrayInterface((3, 5), ptr=0))


def test_structure_matrix_checks_rows_and_columns() -> None:
    s = structure_matrix([list(range(N_STRUCT)), list(range(5, 5 + N_STRUCT))], 2, N_STRUCT)
    assert s.dtype == np.float32 and s.flags.c_contiguous and s.shape == (2, N_STRUCT)
    assert structure_matrix([], 0, N_STRUCT).shape == (0, N_STRUCT)
    with pytest.raises(ValueError, match=rf"expected \[3, {N_STRUCT}\]"):
        structure_matrix(random_structure(2), 3, N_STRUCT)
    with pytest.raises(ValueError, match=rf"expected \[2, {N_STRUCT}\]"):
        structure_matrix(random_structure(2)[:, :3], 2, N_STRUCT)
    with pytest.raises(ValueError, match="2-D"):
        structure_matrix([1.0, 2.0], 2, N_STRUCT)


@pytest.mark.parametrize("batch", [1, 17, 300])
def test_cpu_scoring_matches_xgboost_and_the_predictor(batch: int) -> None:
    booster = trained_booster()
    logits, structure = random_logits(batch, 4099, seed=batch), random_structure(batch, seed=batch)
    X = feature_matrix(logit_features_numpy(logits), structure)
    assert X.shape == (batch, len(FEATURE_NAMES))
    got = score_batch_cpu(logits, Forest.from_booster(booster), structure)
    np.testing.assert_allclose(got, booster.inplace_predict(X), rtol=RTOL, atol=ATOL)
    predictor = Predictor(model_json=bytes(booster.save_raw("json")))
    np.testing.assert_allclose(got, predictor.predict(X), rtol=RTOL, atol=ATOL)
    margin = score_batch_cpu(logits, Forest.from_booster(booster), structure, output_margin=True)
    np.testing.assert_allclose(margin, booster.inplace_predict(X, predict_type="margin"), rtol=RTOL, atol=ATOL)


def test_cpu_scoring_rejects_bad_input_like_the_features() -> None:
    forest = Forest.from_booster(trained_booster(trees=3))
    logits = random_logits(3, 100)
    logits[1] = -np.inf
    with pytest.raises(ValueError, match="row 1 is all -inf"):
        score_batch_cpu(logits, forest, random_structure(3))
    with pytest.raises(ValueError, match="structure has shape"):
        score_batch_cpu(random_logits(3, 100), forest, random_structure(2))
    assert score_batch_cpu(np.empty((0, 100), np.float32), forest, np.empty((0, N_STRUCT), np.float32)).shape == (0,)


# ---------------------------------------------------------------------------------------------
# On the GPU


@pytest.fixture(scope="module")
def device_arrays():
    """torch or cupy with a CUDA device, else skip."""
    if not native.cuda_available():
        pytest.skip("no CUDA device visible (or hera_core._native_cuda not built)")
    return device_array_module()


def to_host(xp, dev) -> np.ndarray:
    return dev.cpu().numpy() if xp.__name__ == "torch" else xp.asnumpy(dev)


def empty_device(xp, shape, dtype):
    if xp.__name__ == "torch":
        return xp.empty(shape, dtype=getattr(xp, dtype), device="cuda")
    return xp.empty(shape, dtype=dtype)


def ptr(xp, dev) -> int:
    return dev.data_ptr() if xp.__name__ == "torch" else dev.data.ptr


def synchronize(xp) -> None:
    xp.cuda.synchronize() if xp.__name__ == "torch" else xp.cuda.Device().synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("batch,vocab", [(1, 151936), (64, 49152), (7, 3), (130, 1025)])
def test_cuda_features_on_device_match_the_cpu_reference(device_arrays, batch: int, vocab: int) -> None:
    xp = device_arrays
    logits = random_logits(batch, vocab, seed=vocab)
    d_logits = to_device(xp, logits)
    d_out, d_status = empty_device(xp, (batch, 3), "float32"), empty_device(xp, (batch,), "int32")
    native.load_cuda().logit_features_device(ptr(xp, d_logits), batch, vocab, ptr(xp, d_out), ptr(xp, d_status), 0)
    synchronize(xp)
    np.testing.assert_allclose(to_host(xp, d_out), logit_features_numpy(logits), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(to_host(xp, d_out), logit_features(logits), rtol=RTOL, atol=ATOL)
    assert not to_host(xp, d_status).any()


@pytest.mark.gpu
def test_cuda_forest_on_device_matches_xgboost(device_arrays) -> None:
    xp = device_arrays
    booster = trained_booster(trees=200, depth=6)
    X = feature_matrix(logit_features_numpy(random_logits(2048, 300, seed=9)), random_structure(2048, seed=9))
    X[::7, 3] = np.nan  # missing values take the default branch
    d_X, d_out = to_device(xp, X), empty_device(xp, (len(X),), "float32")
    with Forest.from_booster(booster).to_cuda() as cuda_forest:
        cuda_forest.predict_device(ptr(xp, d_X), len(X), ptr(xp, d_out))
        synchronize(xp)
    np.testing.assert_allclose(to_host(xp, d_out), booster.inplace_predict(X), rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64, 1000])
def test_scoring_batch_on_the_gpu_matches_the_cpu_path(device_arrays, batch: int) -> None:
    xp = device_arrays
    booster = trained_booster()
    logits, structure = random_logits(batch, 32000, seed=batch), random_structure(batch, seed=batch)
    expected = score_batch_cpu(logits, Forest.from_booster(booster), structure)
    with Forest.from_booster(booster).to_cuda() as cuda_forest:
        got = score_batch_device(to_device(xp, logits), cuda_forest, structure)
        margin = score_batch_device(to_device(xp, logits), cuda_forest, structure, output_margin=True)
    assert got.dtype == np.float32 and got.shape == (batch,)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    X = feature_matrix(logit_features_numpy(logits), structure)
    np.testing.assert_allclose(margin, booster.inplace_predict(X, predict_type="margin"), rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
def test_scoring_batch_on_the_gpu_rejects_bad_rows(device_arrays) -> None:
    xp = device_arrays
    with Forest.from_booster(trained_booster(trees=3)).to_cuda() as cuda_forest:
        logits = random_logits(4, 1000)
        logits[2, 5] = np.nan
        with pytest.raises(ValueError, match="row 2 holds NaN"):
            score_batch_device(to_device(xp, logits), cuda_forest, random_structure(4))
        logits = random_logits(4, 1000)
        logits[3] = -np.inf
        with pytest.raises(ValueError, match="row 3 is all -inf"):
            score_batch_device(to_device(xp, logits), cuda_forest, random_structure(4))
        with pytest.raises(ValueError, match="C-contiguous"):
            score_batch_device(to_device(xp, random_logits(4, 1000))[:, ::2], cuda_forest, random_structure(4))
        assert score_batch_device(to_device(xp, random_logits(0, 10)), cuda_forest, np.empty((0, N_STRUCT))).shape == (0,)


# ---------------------------------------------------------------------------------------------
# The TensorRT-LLM engine itself (a GPU, tensorrt_llm, and HERA_TRT_MODEL=<HF checkpoint folder>)


@pytest.fixture(scope="module")
def trt_engine():
    if not native.cuda_available():
        pytest.skip("no CUDA device visible")
    if importlib.util.find_spec("tensorrt_llm") is None:
        pytest.skip("tensorrt_llm is not installed")
    model = os.environ.get("HERA_TRT_MODEL")
    if not model:
        pytest.skip("set HERA_TRT_MODEL to a Hugging Face checkpoint folder of an instruct model")
    from hera_core.backends.tensorrt import TensorRTLLMEngine

    engine = TensorRTLLMEngine(model, n_ctx=2048, max_batch_size=8, free_gpu_memory_fraction=0.3)
    yield engine
    import asyncio

    asyncio.run(engine.close())


CHATS = [[{"role": "user", "content": "What is 2 + 2? Answer with one number."}],
         [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime above 10."}],
         [{"role": "user", "content": "Write a Python function that reverses a string."}]]


@pytest.mark.gpu
def test_tensorrt_prefill_logits_give_the_greedy_first_token(trt_engine) -> None:
    import asyncio

    async def go():
        pre = await trt_engine.prefill(CHATS[0])
        gen = await trt_engine.generate(CHATS[0], max_tokens=1)
        return pre, gen

    pre, gen = asyncio.run(go())
    assert pre.logits.dtype == np.float32 and pre.logits.ndim == 1 and np.isfinite(pre.logits.max())
    first = trt_engine.tokenizer.decode([int(np.argmax(pre.logits))], skip_special_tokens=True)
    assert gen.text.strip() == first.strip()
    assert gen.cached_tokens > 0  # the scoring request left the prompt's blocks cached


@pytest.mark.gpu
def test_tensorrt_batch_prefill_stays_on_the_device_and_scores(trt_engine) -> None:
    import asyncio

    async def go():
        batch = await trt_engine.prefill_batch_device(CHATS)
        singles = [await trt_engine.prefill(c) for c in CHATS]
        return batch, singles

    batch, singles = asyncio.run(go())
    t = batch.logits
    assert t.is_cuda and t.dtype.is_floating_point and t.is_contiguous() and t.shape[0] == len(CHATS)
    host = t.cpu().numpy()
    for row, single in zip(host, singles):
        assert int(np.argmax(row)) == int(np.argmax(single.logits))
        # Batched kernels round apart, and block reuse moves first-token logits by up to about one
        # bf16 step (TensorRT-LLM issue 15503): close, not equal.
        np.testing.assert_allclose(row, single.logits, rtol=1e-2, atol=0.25)
    structure = np.array([[0, n, len(c), len(c[-1]["content"])] for n, c in zip(batch.prompt_tokens, CHATS)],
                         dtype=np.float32)
    booster = trained_booster()
    with Forest.from_booster(booster).to_cuda() as cuda_forest:
        got = score_batch_device(t, cuda_forest, structure)
    np.testing.assert_allclose(got, score_batch_cpu(host, Forest.from_booster(booster), structure),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
def test_tensorrt_streaming_matches_one_shot(trt_engine) -> None:
    import asyncio

    async def go():
        one = await trt_engine.generate(CHATS[2], max_tokens=48)
        deltas: list[str] = []
        streamed = await trt_engine.generate(CHATS[2], max_tokens=48, on_text=deltas.append)
        return one, streamed, deltas

    one, streamed, deltas = asyncio.run(go())
    assert streamed.text == one.text == "".join(deltas)
    assert streamed.completion_tokens == one.completion_tokens and streamed.ttft_s <= streamed.latency_s
