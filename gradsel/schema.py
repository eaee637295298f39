"""Every Arrow schema gradsel reads or writes, declared in one place."""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# verl's RL data schema (the columns verl's examples/data_preprocess scripts write), as `gradsel demo-data` writes it.
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
    # Which answer the response commits to, as its judge compares answers (rewards.answer_classes):
    # equal numbers are one answer within a problem; null where the response commits to none.
    ("answer_class", pa.int32()),
])

# One row per problem and feature spec: what `gradsel select` ranks on.
SCORES = pa.schema([
    ("problem_id", pa.string()),
    ("split", pa.string()),  # "train" (candidates) or "val"
    ("data_source", pa.string()),
    ("n_rollouts", pa.int32()),
    ("pass_rate", pa.float64()),
    ("reward_mean", pa.float64()),
    ("reward_std", pa.float64()),
    ("zero_advantage", pa.bool_()),
    ("grad_norm", pa.float64()),
    ("score_cos", pa.float64()),
    ("score_dot", pa.float64()),
    # 1 - share of identical-answer pairs whose rewards disagree (1 when no two answers match):
    # a deterministic judge never contradicts itself, a response-independent one often does.
    ("judge_consistency", pa.float64()),
])

VECTOR_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def vectors_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    """Per-problem gradient features: the unit direction as a fixed-size list column
    (memory-mappable), the gradient's L2 norm beside it, and, under exact alignment, the exact
    inner product with the validation gradient. The list's elements are declared non-null, so
    Parquet keeps no definition level per element: a 65,536 x 2,048 shard's column decodes in 0.28 s
    instead of 0.42 s, and the default selection's pass over 1M such vectors takes 10.5-11.2 s
    instead of 13.2-17.5 s (docs/benchmarks.md). Stores written before read as they did."""
    element = pa.field("element", VECTOR_DTYPES[dtype], nullable=False)
    return pa.schema([("problem_id", pa.string()), ("vector", pa.list_(element, dim)),
                      ("norm", pa.float64()), ("target_dot", pa.float64())])


# How vector shards are written: without dictionary encoding or compression, in row groups of
# about 64 MiB. Gradient entries neither repeat nor compress, and Parquet tries a dictionary of
# every float16 before falling back; written plainly, a 65,536 x 2,048 shard reads 5x faster
# (0.7 s instead of 3.9 s). A reader decodes a whole row group at once: one per shard would be
# 1 GiB at 8,192 dimensions.
VECTOR_PARQUET_OPTIONS = {"use_dictionary": False, "compression": "none"}
VECTOR_ROW_GROUP_BYTES = 64 * 2**20


def parquet_options(schema: pa.Schema) -> dict:
    """pyarrow.parquet.write_table options for a table of this schema."""
    if "vector" not in schema.names:
        return {}
    vector = schema.field("vector").type
    row_bytes = vector.list_size * vector.value_type.bit_width // 8
    return VECTOR_PARQUET_OPTIONS | {"row_group_size": max(1024, VECTOR_ROW_GROUP_BYTES // row_bytes)}


# One row per round and offered problem (`refresh`): what each round scored and selected.
HISTORY = pa.schema([
    ("round", pa.int32()),
    ("problem_id", pa.string()),
    ("checkpoint", pa.string()),  # content hash of the round's snapshot
    ("score_cos", pa.float64()),
    ("pass_rate", pa.float64()),
    ("selected", pa.bool_()),
])
