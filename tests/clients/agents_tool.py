"""The OpenAI Agents SDK (its own virtual environment: tests/clients/README.md) runs an agent with
one tool against `hera serve`, over chat completions or the Responses API. The tool is required
at the first turn and its result is the agent's final output, so the run shows the tool was called
through HERA with arguments valid for its schema. Prints {"final_output", "calls"}.

    python agents_tool.py BASE_URL KEY POLICY API       # API: chat | responses
"""

import asyncio
import json
import sys

from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool,
                    set_tracing_disabled)
from openai import AsyncOpenAI

calls: list[dict] = []


@function_tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    calls.append({"a": a, "b": b})
    return a + b


async def main() -> None:
    base_url, key, policy, api = sys.argv[1:5]
    set_tracing_disabled(True)  # no trace export: nothing leaves for the network but hera serve
    client = AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, default_headers={"X-Hera-Policy": policy})
    model = OpenAIChatCompletionsModel("hera", client) if api == "chat" else OpenAIResponsesModel("hera", client)
    agent = Agent(name="adder", instructions="Use the add tool to answer.", tools=[add], model=model,
                  model_settings=ModelSettings(tool_choice="required", max_tokens=64, parallel_tool_calls=False),
                  tool_use_behavior="stop_on_first_tool")
    result = await Runner.run(agent, "What is 2 plus 3?", max_turns=2)
    print(json.dumps({"final_output": str(result.final_output), "calls": calls}))


if __name__ == "__main__":
    asyncio.run(main())
