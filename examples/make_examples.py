"""Regenerate examples/prompts.parquet and examples/openai_batch.jsonl (the files are committed)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent
SYSTEM = "You are a concise assistant. Answer in one or two sentences."


def chat(q, system=True):
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    return msgs + [{"role": "user", "content": q}]


ROWS = [
    {"custom_id": "capital-france", "messages": chat("What is the capital of France?")},
    {"custom_id": "capital-japan", "messages": chat("What is the capital of Japan?")},
    {"custom_id": "capital-brazil", "messages": chat("What is the capital of Brazil?")},
    {"custom_id": "photosynthesis", "messages": chat("Explain photosynthesis to a ten-year-old.")},
    {"custom_id": "haiku-autumn", "messages": chat("Write a haiku about autumn leaves."), "temperature": 0.7, "seed": 7},
    {"custom_id": "python-reverse", "messages": chat("How do I reverse a list in Python?")},
    {"custom_id": "sql-count", "messages": chat("Write an SQL query that counts rows in a table named users.")},
    {"custom_id": "translate-es", "messages": chat("Translate 'good morning' into Spanish.", system=False)},
    {"custom_id": "math-add", "messages": chat("What is 12 plus 30?"), "max_tokens": 16},
    {"custom_id": "tips-sleep", "messages": chat("Give me one tip for better sleep.")},
    {"custom_id": "define-gpu", "messages": chat("What is a GPU?")},
    {"custom_id": "story-start", "prompt": "Once upon a time, in a small village by the sea,", "temperature": 0.8, "seed": 1},
    {"custom_id": "list-colors", "prompt": "Three primary colors are", "max_tokens": 12},
    {"custom_id": "count-to-ten", "prompt": "1, 2, 3, 4,", "stop": ["8"], "max_tokens": 24},
    {"custom_id": "recipe-tea", "prompt": "To make a cup of green tea, first", "stop": ["\n\n"]},
    {"custom_id": "fact-moon", "prompt": "The Moon orbits the Earth roughly every", "max_tokens": 10},
    {"custom_id": "code-hello", "prompt": "# A Python function that prints hello world\ndef", "stop": ["\n\n"], "max_tokens": 32},
    {"custom_id": "email-subject", "messages": chat("Suggest a subject line for a meeting reminder email.")},
    {"custom_id": "water-boil", "messages": chat("At what temperature does water boil at sea level?"), "top_p": 0.9},
    {"custom_id": "greeting", "prompt": "Hello! My name is", "max_tokens": 12, "temperature": 0.0},
]

OPENAI = [
    {"custom_id": "oa-chat-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "smollm2", "messages": chat("What is the largest planet?"), "max_tokens": 24}},
    {"custom_id": "oa-chat-2", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "smollm2", "messages": chat("Name a famous painter."), "max_completion_tokens": 16,
              "temperature": 0}},
    {"custom_id": "oa-cmpl-1", "method": "POST", "url": "/v1/completions",
     "body": {"model": "smollm2", "prompt": "The opposite of hot is", "max_tokens": 8, "temperature": 0}},
    {"custom_id": "oa-bad-temp", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "smollm2", "messages": chat("This row has an invalid temperature."), "temperature": -3}},
]


def main():
    schema = pa.schema([
        ("custom_id", pa.string()),
        ("prompt", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("max_tokens", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("seed", pa.int64()),
        ("stop", pa.list_(pa.string())),
    ])
    pq.write_table(pa.Table.from_pylist(ROWS, schema=schema), HERE / "prompts.parquet")
    with open(HERE / "openai_batch.jsonl", "w") as f:
        for line in OPENAI:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
