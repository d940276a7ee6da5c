"""instructor (its own virtual environment: tests/clients/README.md) asks `hera serve` for a typed
Trip. Prints the trip as JSON; any failure exits non-zero with the traceback.

    python instructor_trip.py BASE_URL KEY POLICY MODE      # MODE: json_schema | tools
"""

import json
import sys
from typing import Literal

import instructor
from openai import OpenAI
from pydantic import BaseModel, Field


class Trip(BaseModel):
    city: str = Field(max_length=24)
    days: int = Field(ge=1, le=14)
    season: Literal["spring", "summer", "autumn", "winter"]


def main() -> None:
    base_url, key, policy, mode = sys.argv[1:5]
    client = instructor.from_openai(
        OpenAI(base_url=base_url, api_key=key, max_retries=0, default_headers={"X-Hera-Policy": policy}),
        mode=instructor.Mode.JSON_SCHEMA if mode == "json_schema" else instructor.Mode.TOOLS)
    trip = client.chat.completions.create(model="hera", response_model=Trip, max_retries=0, max_tokens=96,
                                          messages=[{"role": "user", "content": "Plan a short trip to Lisbon."}])
    print(json.dumps(trip.model_dump()))


if __name__ == "__main__":
    main()
