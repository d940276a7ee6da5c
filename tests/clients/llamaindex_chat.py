"""llama-index's OpenAILike (its own virtual environment: tests/clients/README.md) against
`hera serve`: a chat, a streamed chat, and a typed result by function calling. Prints
{"chat", "stream", "trip"}.

    python llamaindex_chat.py BASE_URL KEY POLICY
"""

import json
import sys
from typing import Literal

from llama_index.core.llms import ChatMessage
from llama_index.core.program import FunctionCallingProgram
from llama_index.core.prompts import PromptTemplate
from llama_index.llms.openai_like import OpenAILike
from pydantic import BaseModel, Field


class Trip(BaseModel):
    """A short trip."""

    city: str = Field(max_length=24)
    days: int = Field(ge=1, le=14)
    season: Literal["spring", "summer", "autumn", "winter"]


def main() -> None:
    base_url, key, policy = sys.argv[1:4]
    llm = OpenAILike(model="hera", api_base=base_url, api_key=key, is_chat_model=True, is_function_calling_model=True,
                     max_tokens=128, max_retries=0, default_headers={"X-Hera-Policy": policy},
                     context_window=2048)
    question = [ChatMessage(role="user", content="Name a colour.")]
    chat = llm.chat(question).message.content
    stream = "".join(chunk.delta or "" for chunk in llm.stream_chat(question))
    # a typed result the way llama-index gets one from a function-calling model: its function
    # program, the tool required (OpenAI's tool_choice "required")
    program = FunctionCallingProgram.from_defaults(output_cls=Trip, prompt=PromptTemplate("Plan a short trip to {city}."),
                                                   llm=llm, tool_required=True)
    trip = program(city="Lisbon")
    print(json.dumps({"chat": chat, "stream": stream, "trip": trip.model_dump()}))


if __name__ == "__main__":
    main()
