"""One validated settings schema for HERA, with bounds and a description per field.

Sources, later wins: defaults < TOML file (`--config hera.toml`) < environment
(HERA_CLOUD_BASE_URL, HERA_CLOUD_API_KEY, HERA_CLOUD_MODEL, HERA_LOCAL_MODEL, HERA_LEDGER_PATH,
HERA_THREADS). An invalid value is a ConfigError whose one-line message names the field.
"""

from __future__ import annotations

import os
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6's stock Python)
    import tomli as tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from hera_core.errors import ConfigError, InvalidRequestError
from hera_core.install.models import default_cache_dir


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Bounds of the local engines' options, each written (and checked) once: the [local] settings and
# the engines' own options below (what their constructors take) are built from these types.
NCtx = Annotated[int, Field(ge=256, le=131072, description="context window of the local SLM, tokens: the longest "
                            "prompt + completion of one subtask (also each slot's size)")]
Threads = Annotated[int, Field(ge=1, le=256, description="llama.cpp decode threads (1 is fastest on 2 shared cores)")]
ThreadsBatch = Annotated[int | None, Field(ge=1, le=256, description="llama.cpp prefill threads; default n_threads")]
GpuLayers = Annotated[int, Field(ge=-1, le=1024, description="llama.cpp layers on the GPU; -1 all; ignored by a "
                                 "CPU build")]
Slots = Annotated[int, Field(ge=1, le=64, description="agent sessions whose KV stays cached at once (sequences)")]
KvBlock = Annotated[int, Field(ge=1, le=4096, description="block size of the KV radix index, tokens")]
KvBudgetTokens = Annotated[int | None, Field(ge=1, description="cap on cached KV, tokens (default: all slots' cells)")]
KvUnified = Annotated[bool, Field(description="one KV pool for all slots: shared prefixes stored once, slower "
                                  "attention")]
FlashAttn = Annotated[bool, Field(description="llama.cpp fused attention (faster prefill on CPU). Set explicitly "
                                  "because llama.cpp's 'auto' depends on the build, and it changes greedy outputs")]
DecodeChunk = Annotated[int, Field(ge=0, le=4096, description="tokens a local answer decodes before other waiting "
                                   "requests (another session's routing prefill) get the engine; 0 = none")]
PrefillChunk = Annotated[int, Field(ge=0, le=65536, description="prompt tokens evaluated per decode step alongside "
                                    "the running answers' next tokens (a long prompt delays them by one chunk); "
                                    "0 = whole")]


class _Options(_Strict):
    """An engine's own options: what its constructor takes as keywords, checked here."""

    @classmethod
    def of(cls, **kwargs: Any):
        """The options from keyword arguments; InvalidRequestError naming the first bad one."""
        try:
            return cls.model_validate(kwargs)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or cls.__name__
            raise InvalidRequestError(f"{where}: {err['msg']} (got {err.get('input')!r})") from None


class LlamaCppOptions(_Options):
    """hera_core.backends.llamacpp.LlamaCppEngine's options (`LocalSettings.llamacpp_options`
    fills them from the settings)."""

    n_ctx: NCtx = 4096
    n_threads: Threads = 1
    n_threads_batch: ThreadsBatch = None
    n_batch: int = Field(512, ge=1, le=65536, description="tokens per llama_decode call (llama.cpp's n_batch)")
    n_slots: Slots = 8
    block_size: KvBlock = 16
    kv_budget_bytes: int | None = Field(None, ge=1, description="cap on the KV bytes the index keeps cached, "
                                        "counting a shared prefix block once (default: all slots' cells)")
    kv_budget_tokens: KvBudgetTokens = None
    kv_unified: KvUnified = False
    n_gpu_layers: GpuLayers = -1
    flash_attn: FlashAttn = True
    decode_chunk: DecodeChunk = 8
    prefill_chunk: PrefillChunk = 256
    tool_grammar: Literal["llama.cpp", "llguidance", False] = Field(
        "llama.cpp", description="what runs the tools' grammar ('llama.cpp' or True, 'llguidance'); False only "
        "to measure what it buys (bench/test_tool_calls.py)")
    batching: bool = Field(True, description="concurrent generations and prompts share each llama_decode; False "
                           "decodes one sequence per call, in turns of decode_chunk tokens")

    @field_validator("tool_grammar", mode="before")
    @classmethod
    def _true_is_llama_cpp(cls, value: Any) -> Any:
        return "llama.cpp" if value is True else value


class TensorRTOptions(_Options):
    """hera_core.backends.tensorrt.TensorRTLLMEngine's options."""

    n_ctx: NCtx = 4096
    max_batch_size: int = Field(64, ge=1, le=65536, description="requests TensorRT-LLM batches at once")
    free_gpu_memory_fraction: float = Field(0.5, gt=0, le=1, description="share of the GPU memory left after the "
                                            "weights that the KV cache takes")
    tokens_per_block: int = Field(32, ge=1, le=4096, description="KV block size of TensorRT-LLM's block reuse")
    logits_source: Literal["generation", "context"] = Field("generation", description="where the last-position "
                                                            "logits come from")
    token_logprobs: bool = Field(False, description="return each generated token's log-probability")
    hot_prefix_tokens: int = Field(1 << 17, ge=1, description="budget of the index mirroring block reuse, tokens")
    backend: Literal["pytorch", "tensorrt"] = Field("pytorch", description="TensorRT-LLM's LLM class to use")

    @model_validator(mode="after")
    def _hot_prefix_holds_a_block(self) -> "TensorRTOptions":
        if self.hot_prefix_tokens < self.tokens_per_block:
            raise ValueError(f"hot_prefix_tokens ({self.hot_prefix_tokens}) is smaller than one block "
                             f"(tokens_per_block = {self.tokens_per_block})")
        return self


class LocalSettings(_Strict):
    engine: Literal["llamacpp", "tensorrt"] = Field("llamacpp", description="local SLM engine: llama.cpp (CPU or CUDA build) or TensorRT-LLM")
    model: str = Field("qwen2.5-coder-0.5b", description="manifest name (see `hera models list`) or path to a .gguf; "
                                                      "for tensorrt, a Hugging Face checkpoint folder")
    n_gpu_layers: GpuLayers = -1
    n_ctx: NCtx = 4096
    n_threads: Threads = 1
    n_threads_batch: ThreadsBatch = None
    n_slots: Slots = 8
    kv_block_tokens: KvBlock = 16
    kv_budget_tokens: KvBudgetTokens = None
    kv_unified: KvUnified = False
    flash_attn: FlashAttn = True
    decode_chunk: DecodeChunk = 8
    prefill_chunk: PrefillChunk = 256
    tool_grammar: Literal["llama.cpp", "llguidance"] = Field(
        "llama.cpp", description="what runs the tools' grammar when the SLM writes a tool call: llama.cpp's grammar "
        "sampler (checks the likeliest tokens first) or llguidance (a mask over the whole vocabulary)")

    @model_validator(mode="after")
    def _budget_holds_a_block(self) -> "LocalSettings":
        if self.kv_budget_tokens is not None and self.kv_budget_tokens < self.kv_block_tokens:
            raise ValueError(f"kv_budget_tokens ({self.kv_budget_tokens}) is smaller than one block "
                             f"(kv_block_tokens = {self.kv_block_tokens})")
        return self

    def llamacpp_options(self) -> LlamaCppOptions:
        """The llama.cpp engine's options from these settings (validated already: the same types)."""
        return LlamaCppOptions.model_construct(
            n_ctx=self.n_ctx, n_threads=self.n_threads, n_threads_batch=self.n_threads_batch, n_slots=self.n_slots,
            block_size=self.kv_block_tokens, kv_budget_tokens=self.kv_budget_tokens, kv_unified=self.kv_unified,
            n_gpu_layers=self.n_gpu_layers, flash_attn=self.flash_attn, decode_chunk=self.decode_chunk,
            prefill_chunk=self.prefill_chunk, tool_grammar=self.tool_grammar)

    def tensorrt_options(self) -> TensorRTOptions:
        """The TensorRT-LLM engine's options from these settings (its other options keep their defaults)."""
        return TensorRTOptions.model_construct(n_ctx=self.n_ctx)


class CloudSettings(_Strict):
    base_url: str | None = Field(None, description="OpenAI-compatible base URL ending in /v1; unset = start `hera cloud-sim`")
    api_key: SecretStr | None = Field(None, description="bearer key of the cloud API; never logged or stored")
    model: str = Field("qwen2.5-coder-1.5b", description="cloud model name (for cloud-sim: a manifest name or .gguf)")
    timeout_s: float = Field(300.0, gt=0, le=3600, description="deadline per cloud request, seconds, retries included")
    max_retries: int = Field(2, ge=0, le=10, description="retries of connection errors, 429 and 5xx")
    sim_threads: int = Field(1, ge=1, le=256, description="threads of the cloud-sim model server")
    fallback: Literal["local", "fail"] = Field("local", description="cloud failed: serve the step on the SLM, or fail (503)")
    breaker_failures: int = Field(5, ge=1, le=1000, description="consecutive failures that open the circuit")
    breaker_reset_s: float = Field(10.0, gt=0, le=3600, description="seconds the circuit stays open before a probe")


class PriceSettings(_Strict):
    """Cloud at a named real model's published per-token price; local from energy and hardware."""

    cloud_price_model: str = Field("gpt-4o-mini", description="the real cloud model whose prices are used")
    cloud_input_usd_per_mtok: float = Field(0.15, ge=0, description="USD per 1M input tokens")
    cloud_output_usd_per_mtok: float = Field(0.60, ge=0, description="USD per 1M output tokens")
    cloud_price_date: str = Field("2024-07-18", description="date the cloud price was published")
    local_watts: float = Field(15.0, ge=0, description="device power draw while the SLM runs, W (Jetson Orin NX class)")
    local_usd_per_kwh: float = Field(0.15, ge=0, description="electricity price, USD per kWh")
    local_amortization_usd_per_hour: float = Field(0.0, ge=0, description="device cost spread over its busy hours")

    def cloud_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.cloud_input_usd_per_mtok + completion_tokens * self.cloud_output_usd_per_mtok) / 1e6

    @property
    def cloud_output_per_input(self) -> float | None:
        """How many input tokens one output token costs (only this ratio weighs steps by cost); None
        for a free cloud (no step costs more than another)."""
        if not self.cloud_input_usd_per_mtok:
            return None if not self.cloud_output_usd_per_mtok else 1e6  # output tokens alone cost
        return self.cloud_output_usd_per_mtok / self.cloud_input_usd_per_mtok

    def local_cost(self, seconds: float) -> float:
        hours = seconds / 3600.0
        return self.local_watts / 1000.0 * hours * self.local_usd_per_kwh + self.local_amortization_usd_per_hour * hours


class PolicySettings(_Strict):
    predictor_path: str | None = Field(None, description="predictor file from `hera train`; default: the shipped one")
    threshold_offset: float = Field(0.0, ge=-1, le=1, description="added to every step's threshold: >0 keeps more steps "
                                    "in the cloud")
    hot_prefix_discount: float = Field(0.0, ge=0, le=1, description="kappa is lowered by this times the share of the "
                                       "prompt already in the device's KV cache (a hot prefix makes the local step cheap)")
    draft_band: float | None = Field(None, ge=0, le=1, description="|P - kappa| below this: the SLM drafts the step, "
                                     "the draft is checked on the device and kept or escalated to the cloud; 0 = off; "
                                     "unset = the band calibrated with the predictor's draft stage (none: off)")
    draft_check_timeout_s: float = Field(5.0, gt=0, le=120, description="limit for running a draft's program, seconds")
    agreement_k: int = Field(0, ge=0, le=8, description="samples of a drafted step that vote on its answer (0 = off): "
                             "2 first, the rest only if those disagree with the draft; the majority answer is the "
                             "local one (bench/eval/agreement_probe.py measures the signal)")
    agreement_min: float = Field(0.5, ge=0, le=1, description="a draft is kept only if at least this share of the "
                                 "samples agree with its answer (with agreement_k > 0)")
    vote: Literal["auto", "off"] = Field(
        "auto", description="'auto': where the predictor has a vote stage (`hera train --votes`), a task's first "
        "step is drafted by the SLM and kept only if its checks pass and enough of k samples agree with its "
        "answer, else escalated; 'off': kappa decides every step")
    unfamiliar: Literal["cloud", "draft", "trust"] = Field(
        "cloud", description="a step unlike every task the predictor was trained on (its familiarity check): "
        "'cloud' sends it to the cloud, 'draft' lets the SLM draft it and keeps the draft only if its checks pass, "
        "'trust' routes it by the predictor anyway")


class LearningSettings(_Strict):
    """Learning the served agent from its own traffic (docs/learning.md)."""

    shadow: bool = Field(False, description="while a step goes to the cloud, the SLM drafts it too when the device "
                         "is idle (never ahead of a client's step); both answers go to the trace store and their "
                         "agreement labels the step")
    folder: Path | None = Field(None, description="trace store and predictor versions; default <cache_dir>/learning")
    max_trace_rows: int = Field(50_000, ge=1, le=10_000_000, description="traced steps kept (oldest deleted first)")
    audit_share: float = Field(0.05, ge=0, le=1, description="share of the steps kept local by a learned predictor "
                               "that also go to the cloud, to measure live agreement (costs cloud tokens)")
    target_agreement: float = Field(0.9, gt=0, lt=1, description="agreement with the cloud that the steps kept "
                                    "local must reach, by a one-sided 95% confidence bound")
    retrain_every: int = Field(0, ge=0, le=1_000_000, description="`hera serve` retrains after this many new labels "
                               "and swaps the predictor between requests (0: only `hera learn` does)")
    min_labels: int = Field(100, ge=10, le=10_000_000, description="labelled steps needed before a predictor is "
                            "learned")
    min_audits: int = Field(5, ge=1, le=10_000, description="audited steps of a version before it can be rolled back")


class ServerSettings(_Strict):
    host: str = Field("127.0.0.1", description="address `hera serve` listens on")
    port: int = Field(8088, ge=0, le=65535, description="port of `hera serve` (0 = any free port)")
    api_keys: list[SecretStr] = Field(default_factory=list, description="client bearer keys; empty = no auth")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="largest request body, bytes (413 past it)")
    max_tokens_cap: int = Field(4096, ge=1, le=131072, description="largest max_tokens a client may ask for (400 past it)")
    max_concurrency: int = Field(64, ge=1, le=100000, description="requests in flight; more get 429 with Retry-After")
    max_local_queue: int = Field(32, ge=1, le=100000, description="subtasks waiting for the SLM; more get 429")
    session_budget_usd: float | None = Field(None, ge=0, description="cloud spend cap per session, USD")
    daily_budget_usd: float | None = Field(None, ge=0, description="cloud spend cap per UTC day, USD")
    budget_action: Literal["local", "refuse"] = Field("local", description="past a cap: run on the SLM, or refuse (429)")


class HeraSettings(_Strict):
    local: LocalSettings = LocalSettings()
    cloud: CloudSettings = CloudSettings()
    prices: PriceSettings = PriceSettings()
    policy: PolicySettings = PolicySettings()
    server: ServerSettings = ServerSettings()
    learning: LearningSettings = LearningSettings()
    cache_dir: Path = Field(default_factory=default_cache_dir, description="models, completion cache, ledger")
    ledger_path: Path | None = Field(None, description="SQLite ledger; default <cache_dir>/ledger.sqlite")
    ledger_url: SecretStr | None = Field(None, description="postgresql://... : one ledger shared by a fleet of nodes "
                                         "(instead of the SQLite file); never logged")
    node_id: str | None = Field(None, max_length=200, description="this node's name in a shared ledger; "
                                "default host:pid")
    ledger_durability: Literal["async", "commit"] = Field(
        "async", description="SQLite ledger: 'async' books rows on a writer thread that commits them in groups "
        "(a clean shutdown loses none; kill -9 can lose the last few milliseconds of rows); 'commit' answers "
        "a step only after its row is committed")
    max_tokens: int = Field(512, ge=1, le=32768, description="default completion limit per subtask")

    def resolved_ledger_path(self) -> Path:
        return self.ledger_path or self.cache_dir / "ledger.sqlite"


_ENV = {
    "HERA_CLOUD_BASE_URL": ("cloud", "base_url"),
    "HERA_CLOUD_API_KEY": ("cloud", "api_key"),
    "HERA_CLOUD_MODEL": ("cloud", "model"),
    "HERA_LOCAL_MODEL": ("local", "model"),
    "HERA_THREADS": ("local", "n_threads"),
    "HERA_LEDGER_PATH": (None, "ledger_path"),
    "HERA_LEDGER_URL": (None, "ledger_url"),
    "HERA_NODE_ID": (None, "node_id"),
    "HERA_LEARNING_SHADOW": ("learning", "shadow"),
}


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
    if "api_key" in where:
        got = ""  # never echo a secret
    return f"config {source}: {where}: {err['msg']}{got}"


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                  env: dict[str, str] | None = None) -> HeraSettings:
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pass an existing TOML file to --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    env = os.environ if env is None else env
    for var, (section, key) in _ENV.items():
        if env.get(var):
            target = data.setdefault(section, {}) if section else data
            target[key] = env[var]
    for dotted, value in (overrides or {}).items():
        *sections, key = dotted.split(".")
        target = data
        for s in sections:
            target = target.setdefault(s, {})
        target[key] = value
    try:
        return HeraSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
