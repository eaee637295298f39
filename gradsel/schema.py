"""Every Arrow schema gradsel reads or writes, declared in one place."""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# verl's RL data schema (DESIGN.md section 5), as `gradsel demo-data` writes it.
VERL_EXTRA_INFO = pa.struct([
    ("split", pa.string()),
    ("index", pa.int64()),
    ("domain", pa.string()),
    ("corrupted", pa.bool_()),
    ("target", pa.bool_()),
    ("low_utility", pa.bool_()),
])
VERL_PROBLEMS = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(MESSAGE)),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
    ("extra_info", VERL_EXTRA_INFO),
])

# One row per problem read from the user's file: what the later stages need, plus where the
# original row lives so that selection can emit it unchanged.
PROBLEMS = pa.schema([
    ("problem_id", pa.string()),
    ("source_row", pa.int64()),
    ("data_source", pa.string()),
    ("reward_style", pa.string()),
    ("ground_truth", pa.string()),
    ("prompt_messages_json", pa.string()),  # chat list as JSON, or a plain string prompt as JSON
    ("extra_info_json", pa.string()),
])

# One row per generated response. Token ids are exactly what the engine produced: the
# gradient stage never re-tokenizes text.
ROLLOUTS = pa.schema([
    ("problem_id", pa.string()),
    ("sample", pa.int32()),
    ("prompt_token_ids", pa.list_(pa.int32())),
    ("response_token_ids", pa.list_(pa.int32())),
    ("response_text", pa.string()),
    ("finish_reason", pa.string()),
    ("response_logprobs", pa.list_(pa.float32())),  # null when the engine gives none
    ("reward", pa.float64()),
])
