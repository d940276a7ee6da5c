"""Choosing the next token: greedy or sampled (temperature, top_p), and under a grammar.

A grammar is compiled from GBNF text by `GrammarCompiler`, run by llama.cpp's grammar sampler or
by llguidance (`tool_grammar`). Its sources: the tools' JSON Schemas (`tool_call`, the grammar of
a tool call) and a `response_format` (`response_format`, the grammar of the whole answer: a JSON
object, or an instance of the schema). Every grammar offers the same three calls (`choose`,
`accept`, `close`), so the decoding loop does not know which engine runs it.
"""

from __future__ import annotations

import abc
import ctypes
from dataclasses import dataclass

import numpy as np

from hera_core.backends.structured import ResponseFormat, schema_gbnf
from hera_core.backends.tools import ToolSet
from hera_core.errors import HeraError, InvalidRequestError

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


def logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token], stable."""
    top = float(logits.max())
    return float(logits[token]) - top - float(np.log(np.exp(logits - top).sum()))


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k likeliest tokens and their log-probabilities, likeliest first (OpenAI's top_logprobs)."""
    if k <= 0:
        return []
    top = float(logits.max())
    norm = top + float(np.log(np.exp(logits - top).sum()))
    ids = np.argpartition(logits, -k)[-k:]
    ids = ids[np.argsort(-logits[ids])]
    return [(int(i), float(logits[i]) - norm) for i in ids]


@dataclass
class Sampling:
    """A sampled generation's parameters and its own random stream (greedy generations have none)."""

    rng: np.random.Generator
    temperature: float = 1.0
    top_p: float = 1.0

    def draw(self, logits: np.ndarray, ids: np.ndarray) -> int:
        """One token of `ids` drawn from softmax(logits / temperature), within the top_p nucleus."""
        z = logits.astype(np.float64) / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p)
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
            p = p[keep] / p[keep].sum()
            ids = ids[keep]
        return int(ids[self.rng.choice(len(p), p=p)])


class Grammar(abc.ABC):
    """A constraint on the tokens of one generation, advanced token by token."""

    label = "the grammar"  # how errors name it

    @abc.abstractmethod
    def choose(self, logits: np.ndarray, sampling: Sampling | None) -> int:
        """The next token among those the grammar allows: the likeliest, or drawn by `sampling`."""

    @abc.abstractmethod
    def accept(self, token: int) -> None:
        """`token` was emitted: advance the grammar past it."""

    def close(self) -> None:
        """Free what the grammar holds (idempotent)."""

    def _none_allowed(self) -> HeraError:
        return HeraError(f"{self.label} allows no token")


class LlamaCppGrammar(Grammar):
    """llama.cpp's grammar sampler: checks the 64 likeliest tokens first, then the 2,048 likeliest,
    the whole vocabulary (unsorted) only if none of those fits. Greedy stays exact: the likeliest
    allowed token is in the first set that has any allowed. The middle stage exists because a JSON
    grammar often allows none of the 64 (the model would write prose) and sorting and checking a
    151,936-token vocabulary costs tens of milliseconds per token."""

    STAGES = (64, 2048)

    def __init__(self, lib, sampler, label: str) -> None:
        self._lib, self._sampler, self.label = lib, sampler, label

    def _allowed(self, ids: np.ndarray, logits: np.ndarray, is_sorted: bool) -> np.ndarray:
        """`ids` with their logits, the grammar's verdict applied: -inf where it forbids."""
        cand = np.zeros(len(ids), dtype=_TOKEN_DATA)
        cand["id"], cand["logit"] = ids, logits[ids]
        arr = self._lib.llama_token_data_array(data=cand.ctypes.data_as(self._lib.llama_token_data_p),
                                               size=len(ids), selected=-1, sorted=is_sorted)
        self._lib.llama_sampler_apply(self._sampler, ctypes.byref(arr))
        return cand

    def choose(self, logits: np.ndarray, sampling: Sampling | None) -> int:
        for k in self.STAGES:
            if k >= len(logits):
                break
            top = np.argpartition(logits, -k)[-k:]
            cand = self._allowed(top[np.argsort(-logits[top])], logits, True)
            allowed = np.flatnonzero(np.isfinite(cand["logit"]))
            if len(allowed) and sampling is not None:
                return sampling.draw(cand["logit"][allowed], cand["id"][allowed])
            if len(allowed):
                return int(cand["id"][allowed[0]])
        cand = self._allowed(np.arange(len(logits)), logits, False)
        allowed = np.flatnonzero(np.isfinite(cand["logit"]))
        if not len(allowed):
            raise self._none_allowed()
        if sampling is not None:
            return sampling.draw(cand["logit"][allowed], cand["id"][allowed])
        return int(cand["id"][allowed[np.argmax(cand["logit"][allowed])]])

    def accept(self, token: int) -> None:
        self._lib.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        if self._sampler is not None:
            self._lib.llama_sampler_free(self._sampler)
            self._sampler = None


class LlgGrammar(Grammar):
    """A grammar run by llguidance: the same GBNF, in its Lark form, giving a mask over the whole
    vocabulary at each step. `specials` maps a literal of the grammar to the special token that
    spells it (the tool-call tags): llguidance matches a special token only where the grammar
    names it, never as the text of a literal."""

    def __init__(self, tokenizer, gbnf: str | None, n_vocab: int, specials: dict[str, int], label: str,
                 source: str, json_schema: dict | None = None) -> None:
        import llguidance
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        if json_schema is not None:  # llguidance compiles JSON Schema itself (bounds, lengths and all)
            spec = llguidance.LLMatcher.grammar_from_json_schema(json_schema,
                                                                  defaults={"whitespace_flexible": False})
        else:
            from llguidance.gbnf_to_lark import gbnf_to_lark

            lark = gbnf_to_lark(gbnf)
            for text, token in specials.items():
                lark = lark.replace(f'"\\n{text}"', f'"\\n" <[{token}]>').replace(f'"{text}"', f"<[{token}]>")
            spec = llguidance.LLMatcher.grammar_from_lark(lark)
        self.label = label
        self.matcher = llguidance.LLMatcher(tokenizer, spec, log_level=0)
        if self.matcher.is_error():
            raise InvalidRequestError(f"{source} could not be turned into a grammar: {self.matcher.get_error()}")
        self._fill, self.n_vocab = fill_next_token_bitmask, n_vocab
        self._bitmask = allocate_token_bitmask(1, n_vocab)

    def allowed(self) -> np.ndarray:
        """Bool [n_vocab]: the tokens the grammar allows next."""
        self._fill(self.matcher, self._bitmask)
        return np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")[: self.n_vocab].astype(bool)

    def choose(self, logits: np.ndarray, sampling: Sampling | None) -> int:
        ok = self.allowed()
        if not ok.any():
            raise self._none_allowed()
        if sampling is not None:
            return sampling.draw(logits[ok], np.flatnonzero(ok))
        return int(np.argmax(np.where(ok, logits, -np.inf)))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)


class GrammarCompiler:
    """Compiles GBNF into grammars of one engine ("llama.cpp" or "llguidance"; False: none, to
    measure what grammars buy) over one model's vocabulary."""

    def __init__(self, engine: str | bool, lib, vocab, n_vocab: int, specials: dict[str, int | None]) -> None:
        self.engine = engine
        self._lib, self._vocab, self.n_vocab = lib, vocab, n_vocab
        self._specials = {text: tok for text, tok in specials.items() if tok is not None}
        self._llg_tokenizer = None  # built on first use (about a second, once per engine)

    def __bool__(self) -> bool:
        return bool(self.engine)

    def compile(self, gbnf: str, *, label: str, source: str) -> Grammar:
        """A grammar of `gbnf` (root rule "root"); `label` names it in errors while decoding,
        `source` names what it was made from when it does not compile."""
        if self.engine == "llguidance":
            return LlgGrammar(self._llg(), gbnf, self.n_vocab, self._specials, label, source)
        sampler = self._lib.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        if not sampler:
            raise InvalidRequestError(f"{source} could not be turned into a grammar")
        return LlamaCppGrammar(self._lib, sampler, label)

    def tool_call(self, toolset: ToolSet, opened: bool) -> Grammar:
        """The grammar of a tool call of `toolset` (`opened`: its opening tag already emitted)."""
        return self.compile(toolset.grammar(opened), label="the tool-call grammar", source="the tools' JSON Schemas")

    def response_format(self, fmt: ResponseFormat) -> Grammar:
        """The grammar of a whole structured answer: an instance of `fmt`'s schema (bounded integers
        included, `schema_gbnf`), the prompt as the client sent it (no tool wrapper). llguidance
        compiles the schema itself (the converter's GBNF nests too deeply for its Lark form)."""
        label, source = "the response_format grammar", "the response_format's JSON Schema"
        if self.engine == "llguidance":
            return LlgGrammar(self._llg(), None, self.n_vocab, {}, label, source, json_schema=fmt.schema())
        return self.compile(schema_gbnf(fmt.schema()), label=label, source=source)

    def _llg(self):
        if self._llg_tokenizer is None:
            from llguidance.llamacpp import lltokenizer_from_vocab

            # Every end-of-generation token ends a call (Qwen ends a turn with <|im_end|>, not its EOS).
            eog = [t for t in range(self.n_vocab) if self._lib.llama_vocab_is_eog(self._vocab, t)]
            self._llg_tokenizer = lltokenizer_from_vocab(self._vocab, n_vocab=self.n_vocab, eos_token=eog)
        return self._llg_tokenizer


def choose(logits: np.ndarray, grammar: Grammar | None, sampling: Sampling | None, banned: int | None = None) -> int:
    """The next token: greedy, or drawn by `sampling`; under `grammar` among the tokens it allows;
    never `banned` (the tool-call opener when the client said tool_choice "none")."""
    if grammar is not None:
        return grammar.choose(logits, sampling)
    if banned is not None:
        logits = logits.copy()  # (the slot may keep these logits for an exact repeat)
        logits[banned] = -np.inf
    if sampling is not None:
        return sampling.draw(logits, np.arange(len(logits)))
    return int(np.argmax(logits))

