"""The paper's embedding-similarity label, on the real all-MiniLM-L6-v2 shipped in its package."""

from hera_core.offline.similarity import SIMILAR, add_similarity, cosine_similarities, load_encoder
from hera_core.offline.training import compare_labels
from tests.factories import trace


def test_similar_outputs_score_high_and_different_ones_low():
    enc = load_encoder()
    sims = cosine_similarities(enc, ["The answer is 42.", "ANSWER: Paris"],
                               ["So the result is 42.", "def f(x):\n    return x * 2"])
    assert sims[0] > SIMILAR > sims[1]


def test_compare_labels_reports_both_predictors():
    enc = load_encoder()
    texts = [("ANSWER: 4", "ANSWER: 4"), ("print(2+2)", "The capital is Rome")]

    def with_texts(tr, i):
        for s, (a, b) in zip(tr["steps"], texts[i % 2:] + texts[: i % 2]):
            s["slm_text"], s["llm_text"] = a, b
        return tr

    train = [with_texts(trace(f"t{i}", "train", 1.0, [i % 2, (i + 1) % 2], [float(i % 2), float((i + 1) % 2)]), i)
             for i in range(40)]
    held = [with_texts(trace(f"v{i}", "val", 1.0, [i % 2, (i + 1) % 2], [float(i % 2), float((i + 1) % 2)]), i)
            for i in range(10)]
    out = compare_labels(add_similarity(train, enc), {"val": add_similarity(held, enc)})
    assert set(out["trained_on"]) == {"substitution", "similarity"}
    assert out["trained_on"]["substitution"]["val"]["auc_vs_substitution"] == 1.0  # feature 0 is the label
