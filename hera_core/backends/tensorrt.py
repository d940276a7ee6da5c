"""Local SLM engine on TensorRT-LLM's Python LLM API, for NVIDIA GPUs (workstation, server, Jetson).

`tensorrt_llm` is imported in the constructor only: importing this module needs nothing, and a
machine without the package gets a ConfigError naming it and how to install it.

UNVERIFIED: written against the LLM API of TensorRT-LLM 1.x without a GPU or the wheel, then
checked call by call against its source (llmapi/llm.py, llmapi/llm_args.py, sampling_params.py,
executor/result.py, _torch/pyexecutor/handle_logits.py); tests/test_gpu_engines.py has the checks
to run where both exist. The API parts used:
- `LLM(model=..., tokenizer=..., kv_cache_config=KvCacheConfig(enable_block_reuse=True, ...),
  max_seq_len=..., max_batch_size=...)`; `LLM.shutdown()`. `tensorrt_llm.LLM` is the PyTorch
  backend (a Hugging Face checkpoint; it refuses engine folders and `build_config`);
  `backend="tensorrt"` takes `tensorrt_llm._tensorrt_engine.LLM` (TensorRT engines), which
  also gets `gather_generation_logits=True`.
- `LLM.generate_async(prompt, sampling_params, streaming=False)` returns a GenerationResult: await
  it for the final RequestOutput, or `async for` over it when streaming (the same object,
  updated; `.outputs[0].text` is the text so far); `.abort()` cancels the request.
- `SamplingParams(max_tokens, temperature=0.0, top_k=1 (greedy), stop, logprobs,
  return_generation_logits, return_context_logits, return_perf_metrics)`.
- `CompletionOutput`: text, token_ids, finish_reason ("stop" | "length" | "timeout" |
  "cancelled"), logprobs, generation_logits (torch [generated tokens, vocab]),
  request_perf_metrics.kv_cache_metrics.num_reused_blocks; `RequestOutput.context_logits`, and
  in newer 1.x releases `RequestOutput.cached_tokens` (the exact reused prompt tokens).

KV-cache reuse is TensorRT-LLM's own block reuse (`enable_block_reuse`): the KV of a finished
request stays in blocks of `tokens_per_block` tokens keyed by their content, and a later prompt
that starts with the same tokens takes those blocks instead of recomputing them (partial reuse,
on by default, also matches a partly filled last block). It serves what the radix index and the
slots do in backends/llamacpp/: the next step of a session, or a shared system prompt, prefills only its
new tokens. Scoring and decoding are two requests here (the LLM API has no "decode on from this
prefill" call), so a local step's decode request finds its prompt cached by the scoring request
and recomputes only its unmatched tail (with partial reuse, the last token).

Last-position logits (what the router's features are computed from): by default the scoring
request asks for one token with `return_generation_logits=True`; row 0 of
`outputs[0].generation_logits` is the distribution the first token is drawn from, i.e. the logits
after the last prompt token (executor/result.py `compute_logprobs` reads row t as the logits of
output token t). It is one vocab-sized row per request. `logits_source="context"` instead takes
the last row of `RequestOutput.context_logits` (`return_context_logits=True`): the same numbers,
but TensorRT-LLM then materialises [prompt tokens evaluated, vocab] per request (with block reuse
only the recomputed suffix, whose last row is still the last prompt position), and the TensorRT
backend needs `build_config=BuildConfig(gather_context_logits=True)` in `llm_kwargs`. TensorRT-LLM's
own tests skip context logits together with block reuse for a known bug (nvbugs/5577178), so
"generation" stays the default.

Where the logits live: in the PyTorch backend the worker keeps context logits in device memory,
and generation logits in pinned host memory by default (chunked transfer); the LLM API also runs
its executor in a worker process unless TLLM_WORKER_USE_SINGLE_PROCESS=1, and tensors cross that
boundary on the host. So the rows can arrive on either side: `prefill` returns a host numpy row
(the Engine interface), and `prefill_batch_device` returns a CUDA float32 [batch, vocab] tensor,
moving rows that arrived on the host to the device with one copy per batch (counted in
`stats["logits_rows_uploaded"]`, so a deployment can see whether it gets the zero-copy path).
hera_core.gpu.scoring.score_batch_device scores that tensor with no copy back to the host.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hera_core.errors import ConfigError, HeraError, InvalidRequestError
from hera_core.native.radix import HotPrefixTracker
from hera_core.backends.base import Engine, Generation, Message, Prefill, check_context
from hera_core.config import TensorRTOptions

if TYPE_CHECKING:
    from hera_core.config import HeraSettings

INSTALL_HINT = (
    "install it with `pip install tensorrt-llm` (Linux x86_64 or aarch64 with an NVIDIA GPU and a "
    "matching CUDA driver; Jetson: see engines/jetson.md), or set local.engine = \"llamacpp\""
)


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _import_tensorrt_llm() -> Any:
    """tensorrt_llm, or ConfigError with a one-line message naming the package and the fix."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise ConfigError("the TensorRT-LLM engine needs the tensorrt_llm package, which is not installed; "
                          + INSTALL_HINT)
    try:
        import tensorrt_llm
    except (ImportError, OSError) as exc:  # a missing libcuda / libnvinfer, a CUDA mismatch
        raise ConfigError(
            f"tensorrt_llm is installed but does not import ({_one_line(exc)}); check that the NVIDIA "
            "driver, CUDA and TensorRT match its version (engines/tensorrt-llm.md)"
        ) from None
    return tensorrt_llm


def _first_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.index(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _load_tokenizer(source: str) -> Any:
    """The Hugging Face tokenizer (and chat template) of `source`, or a one-line ConfigError."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("the TensorRT-LLM engine formats chats with the model's tokenizer and needs the "
                          "transformers package; install it with `pip install transformers`") from None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {source} ({_one_line(exc)}); pass tokenizer= "
                          "the Hugging Face checkpoint folder of the model") from None


def _llm_args(model: str | Path, tokenizer: str | Path | None, opts: TensorRTOptions) -> dict[str, Any]:
    """The `LLM(...)` arguments of the options."""
    from tensorrt_llm.llmapi import KvCacheConfig

    kv_fields: dict[str, Any] = {"enable_block_reuse": True, "free_gpu_memory_fraction": opts.free_gpu_memory_fraction}
    if "tokens_per_block" in getattr(KvCacheConfig, "model_fields", {}):
        kv_fields["tokens_per_block"] = opts.tokens_per_block  # a KvCacheConfig field in 1.x (PyTorch backend)
    args: dict[str, Any] = {"model": str(model), "kv_cache_config": KvCacheConfig(**kv_fields),
                            "max_seq_len": opts.n_ctx, "max_batch_size": opts.max_batch_size}
    if tokenizer is not None:
        args["tokenizer"] = str(tokenizer)
    if opts.n_ctx > 8192:  # max_num_tokens (tokens per iteration, default 8192) must hold a whole prompt
        args["max_num_tokens"] = opts.n_ctx
    if opts.logits_source == "generation" and opts.backend == "tensorrt":
        # A TensorRT engine keeps generation logits only when built to; the PyTorch backend
        # returns them without it (and the flag would pull its worker into this process).
        args["gather_generation_logits"] = True
    return args


@dataclass
class DevicePrefillBatch:
    """The last-position logits of a batch of prompts, in GPU memory."""

    logits: Any  # torch.Tensor, CUDA, float32, C-contiguous [batch, vocab]
    prompt_tokens: list[int]  # per prompt
    cached_tokens: list[int]  # per prompt: tokens whose KV blocks were reused
    latency_s: float  # submit of the first request to the tensor being ready
    uploaded_rows: int  # rows TensorRT-LLM returned in host memory and that were copied in



def sampling_fields(*, max_tokens: int, stop: list[str] | None, scoring: bool, stop_token_ids: list[int],
                    accepted: frozenset[str], logits_source: str, token_logprobs: bool) -> dict[str, Any]:
    """Greedy SamplingParams fields (temperature 0 and top_k 1: reproducible, cacheable outputs);
    `accepted`: the fields this TensorRT-LLM release's SamplingParams has."""
    fields: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "top_k": 1}
    if stop:
        fields["stop"] = list(stop)
    if stop_token_ids and "stop_token_ids" in accepted:
        fields["stop_token_ids"] = list(stop_token_ids)
    if scoring:
        fields["return_generation_logits" if logits_source == "generation" else "return_context_logits"] = True
    elif token_logprobs:
        fields["logprobs"] = 1
    if "return_perf_metrics" in accepted:
        fields["return_perf_metrics"] = True  # for the reused-block count
    return fields


def reused_tokens(out: Any, prompt_tokens: int, hot: int, tokens_per_block: int) -> int:
    """Reused prompt tokens of a finished request: TensorRT-LLM's exact count
    (`RequestOutput.cached_tokens`, newer 1.x), else its reused blocks x block size, else `hot`, the
    hot-prefix index's estimate taken before the request. Never the whole prompt: the last prompt
    token is always computed."""
    cap = max(prompt_tokens - 1, 0)
    exact = getattr(out, "cached_tokens", None)
    if isinstance(exact, int) and exact > 0:
        return min(cap, exact)
    metrics = getattr(out.outputs[0], "request_perf_metrics", None)
    reused = getattr(getattr(metrics, "kv_cache_metrics", None), "num_reused_blocks", None)
    if reused is None:
        return min(cap, hot)
    return min(cap, int(reused) * tokens_per_block)

class TensorRTLLMEngine(Engine):
    is_local = True

    def __init__(self, model: str | Path, *, name: str | None = None, tokenizer: str | Path | None = None,
                 llm_kwargs: Mapping[str, Any] | None = None, options: TensorRTOptions | None = None,
                 **kwargs: Any) -> None:
        """model: a Hugging Face checkpoint folder (or hub name); with backend="tensorrt", a
        TensorRT engine folder (then `tokenizer` must name the checkpoint whose tokenizer and chat
        template to use). llm_kwargs: further `LLM(...)` arguments, passed as they are (they win
        over the options). The options, as `options` or as keywords (hera_core.config.
        TensorRTOptions, checked there first; a bad one is an InvalidRequestError naming it):
        backend: "pytorch" (TensorRT-LLM's default LLM) or "tensorrt" (its TensorRT-engine LLM,
        which also takes `build_config` in llm_kwargs). n_ctx: longest prompt + completion of one
        subtask, tokens (TensorRT-LLM's max_seq_len). free_gpu_memory_fraction: share of the GPU
        memory left after loading the weights that the KV cache takes (on Jetson the GPU shares
        the system memory: keep it well under 1). token_logprobs: also return each generated
        token's log-probability in Generation.extra. hot_prefix_tokens: budget of the radix index
        that mirrors what block reuse probably still holds (size it like the device KV cache, in
        tokens): the routing signal of hot prefixes."""
        if options is not None and kwargs:
            raise TypeError("pass options= or the options as keywords, not both")
        opts = options if options is not None else TensorRTOptions.of(**kwargs)
        _import_tensorrt_llm()
        import torch
        from tensorrt_llm import SamplingParams

        if opts.backend == "tensorrt":
            from tensorrt_llm._tensorrt_engine import LLM
        else:
            from tensorrt_llm import LLM

        source = str(tokenizer or model)
        self.tokenizer = _load_tokenizer(source)
        self.name = name or Path(str(model)).name
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"model {self.name} has no chat template; use an instruct model")

        self._torch = torch
        self._SamplingParams = SamplingParams
        # SamplingParams fields vary across releases (return_perf_metrics is recent): send only known ones.
        self._sampling_fields = frozenset(getattr(SamplingParams, "__dataclass_fields__", ()))
        # TensorRT-LLM ends on the tokenizer's EOS only; instruct models whose turn-end token is
        # another one (Llama 3's <|eot_id|>) list it in generation_config.json: stop on those too.
        self._stop_token_ids = generation_eos_ids(source)
        self.n_ctx = opts.n_ctx
        self.tokens_per_block = opts.tokens_per_block  # KV block size; converts reused blocks to tokens
        self.logits_source = opts.logits_source
        self.token_logprobs = opts.token_logprobs
        args = _llm_args(model, tokenizer, opts)
        args.update(llm_kwargs or {})
        try:
            self._llm = LLM(**args)
        except Exception as exc:  # noqa: BLE001 - any load failure becomes one line naming the model
            raise ConfigError(f"TensorRT-LLM could not load {model}: {_one_line(exc)}") from None
        self._device = torch.device("cuda", torch.cuda.current_device())  # where device batches go
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "generated_tokens": 0, "logits_rows_uploaded": 0}
        # Storage is TensorRT-LLM's; the radix index only tracks which prefixes are hot, for routing.
        self._hot = HotPrefixTracker(opts.tokens_per_block, opts.hot_prefix_tokens)

    @classmethod
    def from_settings(cls, settings: "HeraSettings") -> "TensorRTLLMEngine":
        """The engine the settings' [local] section describes (local.model: a checkpoint folder)."""
        return cls(settings.local.model, options=settings.local.tensorrt_options())

    # --- tokens -------------------------------------------------------------------------------
    def tokenize_messages(self, messages: list[Message]) -> list[int]:
        """The chat formatted with the model's own template (generation prompt added), as ids."""
        if not messages:
            raise InvalidRequestError("messages must not be empty")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # noqa: BLE001 - jinja raises for roles the template does not accept
            raise InvalidRequestError(
                f"cannot format messages with the model's chat template: {_one_line(exc)}") from None
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def _check_fits(self, tokens: list[int]) -> None:
        check_context(len(tokens), self.n_ctx)

    def cache_stats(self) -> dict[str, float]:
        seen = self.stats["prefill_tokens"] + self.stats["reused_tokens"]
        return {**self.stats, "hit_rate": self.stats["reused_tokens"] / seen if seen else 0.0}

    # --- requests -------------------------------------------------------------------------------
    def _params(self, *, max_tokens: int, stop: list[str] | None = None, scoring: bool = False) -> Any:
        fields = sampling_fields(max_tokens=max_tokens, stop=stop, scoring=scoring, stop_token_ids=self._stop_token_ids,
                                 accepted=self._sampling_fields, logits_source=self.logits_source,
                                 token_logprobs=self.token_logprobs)
        return self._SamplingParams(**fields)

    def _cached_tokens(self, out: Any, prompt_tokens: int, hot: int) -> int:
        return reused_tokens(out, prompt_tokens, hot, self.tokens_per_block)

    def hot_prefix_tokens(self, messages: list[Message]) -> int:
        """How much of this prompt is probably cached on the device now (before running it)."""
        return self._hot.hot(self.tokenize_messages(messages))

    def _book_prompt(self, prompt_tokens: int, cached: int) -> None:
        self.stats["prefill_tokens"] += prompt_tokens - cached
        self.stats["reused_tokens"] += cached

    async def _score_request(self, messages: list[Message]) -> tuple[list[int], Any, int]:
        """One request for one token, asking for the logits of the last prompt position.
        Returns (tokens, output, reused prompt tokens)."""
        if self._llm is None:
            raise HeraError("the TensorRT-LLM engine is closed")
        tokens = self.tokenize_messages(messages)
        self._check_fits(tokens)
        hot = self._hot.hot(tokens)
        out = await self._llm.generate_async(tokens, self._params(max_tokens=1, scoring=True))
        self._hot.served(tokens)
        cached = self._cached_tokens(out, len(tokens), hot)
        self._book_prompt(len(tokens), cached)
        return tokens, out, cached

    def _last_position_logits(self, out: Any) -> Any:
        """torch [vocab] (device or host, model dtype): the logits after the last prompt token."""
        if self.logits_source == "generation":
            t = out.outputs[0].generation_logits  # [generated, vocab]; row 0 is after the prompt
            row = None if t is None or t.shape[-2] < 1 else t.reshape(-1, t.shape[-1])[0]
        else:
            t = out.context_logits  # [prompt positions evaluated, vocab]; the last is the prompt's last
            row = None if t is None or t.shape[0] < 1 else t[-1]
        if row is None:
            raise HeraError(f"TensorRT-LLM returned no {self.logits_source} logits for a scoring request; "
                            f"check that this TensorRT-LLM version supports return_{self.logits_source}_logits "
                            "(engines/tensorrt-llm.md)")
        return row

    # --- Engine interface ----------------------------------------------------------------------
    async def prefill(self, messages: list[Message], *, toolset: object = None) -> Prefill:
        """The prompt's last-position logits as a host float32 [vocab] array (one row copied to
        the host if it arrived on the device). Batches for GPU scoring: prefill_batch_device."""
        _no_tools(toolset)
        t0 = time.perf_counter()
        tokens, out, cached = await self._score_request(messages)
        row = self._last_position_logits(out).detach().to(device="cpu", dtype=self._torch.float32)
        return Prefill(logits=np.ascontiguousarray(row.numpy(), dtype=np.float32), prompt_tokens=len(tokens),
                       cached_tokens=cached, latency_s=time.perf_counter() - t0)

    async def prefill_batch_device(self, batch: list[list[Message]]) -> DevicePrefillBatch:
        """Score-prefill several prompts at once (TensorRT-LLM batches the concurrent requests in
        flight) and return their last-position logits as one CUDA float32 [batch, vocab] tensor,
        ready for hera_core.gpu.scoring.score_batch_device."""
        if not batch:
            raise InvalidRequestError("the batch must hold at least one conversation")
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self._score_request(messages) for messages in batch))
        rows = [self._last_position_logits(out).detach() for _, out, _ in results]
        uploaded = sum(1 for r in rows if r.device.type != "cuda")
        # Stack where the rows are, then one move/cast to the device (no-op for rows already there).
        logits = self._torch.stack(rows).to(device=self._device, dtype=self._torch.float32).contiguous()
        self.stats["logits_rows_uploaded"] += uploaded
        return DevicePrefillBatch(logits=logits, prompt_tokens=[len(t) for t, _, _ in results],
                                  cached_tokens=[cached for _, _, cached in results],
                                  latency_s=time.perf_counter() - t0, uploaded_rows=uploaded)

    async def generate(self, messages: list[Message], *, max_tokens: int = 256,
                       stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
                       toolset: object = None, **_: object) -> Generation:
        """Greedy completion; streamed to `on_text` (on the event loop's thread) when given."""
        _no_tools(toolset)
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
        if self._llm is None:
            raise HeraError("the TensorRT-LLM engine is closed")
        t0 = time.perf_counter()
        tokens = self.tokenize_messages(messages)
        self._check_fits(tokens)
        max_tokens = max(1, min(max_tokens, self.n_ctx - len(tokens)))
        hot = self._hot.hot(tokens)
        stop = [s for s in (stop or []) if s]
        # TensorRT-LLM matches stop strings on token ids; the text check below also catches a stop
        # string that the model produced with another tokenization.
        request = self._llm.generate_async(tokens, self._params(max_tokens=max_tokens, stop=stop),
                                           streaming=on_text is not None)
        ttft: float | None = None
        cut: int | None = None
        if on_text is None:
            out = await request
            text = out.outputs[0].text
            cut = _first_stop(text, stop)
        else:
            holdback = max((len(s) for s in stop), default=1) - 1  # what could still become a stop string
            sent, text, out = 0, "", None
            async for out in request:
                if ttft is None and out.outputs[0].token_ids:
                    ttft = time.perf_counter() - t0
                text = out.outputs[0].text
                cut = _first_stop(text, stop)
                if cut is not None:
                    if not out.finished:
                        request.abort()
                    break
                if len(text) - holdback > sent:
                    on_text(text[sent: len(text) - holdback])
                    sent = len(text) - holdback
            if out is None:
                raise HeraError("TensorRT-LLM ended a streamed request without any output")
            if cut is not None:
                text = text[:cut]
            if len(text) > sent:
                on_text(text[sent:])
        if cut is not None:
            text = text[:cut]
        completion = out.outputs[0]
        finish = "stop" if cut is not None or completion.finish_reason != "length" else "length"
        n_out = len(completion.token_ids)
        self._hot.served(tokens + list(completion.token_ids))
        cached = self._cached_tokens(out, len(tokens), hot)
        self._book_prompt(len(tokens), cached)
        self.stats["generated_tokens"] += n_out
        extra: dict[str, Any] = {}
        if self.token_logprobs:
            extra["token_logprobs"] = _sampled_logprobs(completion)
        latency = time.perf_counter() - t0
        return Generation(text=text, prompt_tokens=len(tokens), completion_tokens=n_out, latency_s=latency,
                          ttft_s=ttft if ttft is not None else latency, finish_reason=finish,
                          cached_tokens=cached, model=self.name, extra=extra)

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)


def generation_eos_ids(source: str) -> list[int]:
    """The end-of-turn token ids of a checkpoint's generation_config.json (none if it has none)."""
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(source).eos_token_id
    except (ImportError, OSError, ValueError):
        return []
    if eos is None:
        return []
    return [int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _sampled_logprobs(completion: Any) -> list[float]:
    """Log-probability of each generated token. CompletionOutput.logprobs is a list of floats, or
    of {token_id: Logprob} (top-k plus the sampled token) depending on the release."""
    out: list[float] = []
    for token, entry in zip(completion.token_ids, completion.logprobs or []):
        if isinstance(entry, Mapping):
            lp = entry.get(token)
            out.append(float(lp.logprob) if lp is not None else float("nan"))
        else:
            out.append(float(entry))
    return out


def _no_tools(toolset: object) -> None:
    """Tool calls need a grammar this engine does not apply yet: such steps go to the cloud."""
    if toolset is not None:
        from hera_core.errors import CannotServeLocallyError

        raise CannotServeLocallyError("the TensorRT-LLM engine does not decode tool calls yet")
