"""Engines: one small async interface over a local SLM (llama.cpp) and a cloud LLM (HTTP)."""

from .base import Engine, Generation, Message, Prefill

__all__ = ["Engine", "Generation", "Message", "Prefill"]
