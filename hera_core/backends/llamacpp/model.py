"""The loaded model: a llama.cpp model and context (one sequence per slot), its owning batch, the
chat template and the tokenizer, and the two KV calls the slot cache makes (`seq_rm`, `seq_cp`).
Everything here runs on the engine thread (a llama.cpp context is not thread-safe)."""

from __future__ import annotations

from pathlib import Path

from hera_core.backends.base import Message
from hera_core.backends.llamacpp.batch import Batch
from hera_core.backends.tools import CLOSE, OPEN, ToolSet, template_messages
from hera_core.config import LlamaCppOptions
from hera_core.errors import InvalidRequestError


class LoadedModel:
    """Owns the llama.cpp model, context and batch; `close()` frees them."""

    def __init__(self, model_path: str | Path, name: str, opts: LlamaCppOptions) -> None:
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp import _logger

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        _logger.set_verbose(False)  # llama.cpp's load and graph logs are noise here
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers  # a CUDA build (Jetson) offloads; a CPU build ignores it
        self._model = internals.LlamaModel(path_model=str(model_path), params=mparams, verbose=False)
        self.kv_cells = opts.n_slots * opts.n_ctx  # every slot can hold a whole context
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.kv_cells
        cparams.n_batch = opts.n_batch
        cparams.n_ubatch = min(opts.n_batch, 512)
        cparams.n_seq_max = opts.n_slots
        cparams.kv_unified = opts.kv_unified
        cparams.flash_attn_type = 1 if opts.flash_attn else 0  # explicit: "auto" may differ by build
        cparams.n_threads = opts.n_threads
        cparams.n_threads_batch = opts.n_threads_batch or opts.n_threads
        self._ctx = internals.LlamaContext(model=self._model, params=cparams, verbose=False)
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self._model.model)
        self.n_vocab = self._model.n_vocab()
        self.batch = Batch(llama_cpp, self._ctx.ctx, opts.n_batch, self.n_vocab, self.kv_cells)
        self._formatter = self._chat_formatter(name)
        # The tokens that open and close a tool call in the Hermes/Qwen format, where the vocabulary
        # has them (auto tool choice switches the grammar on when the model emits the opener).
        self.open_token, self.close_token = self._special(OPEN), self._special(CLOSE)
        # KV bytes per token (f16 K and V over all layers), for the index's byte accounting.
        m = self._model.model
        head_dim = llama_cpp.llama_model_n_embd(m) // llama_cpp.llama_model_n_head(m)
        self.kv_bytes_per_token = 2 * 2 * llama_cpp.llama_model_n_layer(m) * llama_cpp.llama_model_n_head_kv(m) * head_dim

    def _chat_formatter(self, name: str):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self._model.metadata().get("tokenizer.chat_template")
        if not template:
            raise InvalidRequestError(f"model {name} has no chat template; use an instruct model")
        eos, bos = self._model.token_eos(), self._model.token_bos()
        return Jinja2ChatFormatter(template=template, eos_token=self._model.token_get_text(eos),
                                   bos_token=self._model.token_get_text(bos) if bos != -1 else "")

    def _special(self, text: str) -> int | None:
        ids = self._model.tokenize(text.encode(), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 else None

    # --- tokens -------------------------------------------------------------------------------
    def tokenize_messages(self, messages: list[Message], toolset: ToolSet | None = None) -> list[int]:
        """The chat as the model's template renders it; offered tools go in the template's tools
        section (none with tool_choice "none": the model is not to call any)."""
        if not messages:
            raise InvalidRequestError("messages must not be empty")
        tools = list(toolset.tools) if toolset is not None and toolset.choice != "none" else None
        try:
            prompt = self._formatter(messages=template_messages(messages), tools=tools).prompt
        except Exception as exc:  # jinja raises for roles the template does not accept
            raise InvalidRequestError(f"cannot format messages with the model's chat template: {exc}") from exc
        return self._model.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def tokenize_text(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, tokens: list[int]) -> str:
        return self._model.detokenize(tokens, special=False).decode("utf-8", errors="ignore")

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token spells (special tokens as their text)."""
        return self._model.detokenize([token], special=True)

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends a generation (EOS, or a turn-end token such as Qwen's <|im_end|>)."""
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    # --- the KV calls of the slot cache -------------------------------------------------------
    def seq_rm(self, seq: int, start: int) -> None:
        """Drop sequence `seq`'s KV from position `start` on."""
        self.lib.llama_memory_seq_rm(self._mem, seq, start, -1)

    def seq_cp(self, src: int, dst: int, end: int) -> None:
        """Give `dst` the KV of `src`'s positions 0..end (-1: all of it)."""
        self.lib.llama_memory_seq_cp(self._mem, src, dst, 0 if end >= 0 else -1, end)

    def close(self) -> None:
        self.batch.close()
        if self._ctx is not None:
            self._ctx.close()
            self._model.close()
            self._ctx = None
