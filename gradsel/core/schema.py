"""Every Arrow schema gradsel reads or writes, declared in one place."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# verl's RL data schema (the columns verl's examples/data_preprocess scripts write). extra_info
# holds verl's split and index; a writer may add fields of its own (the demo data adds its labels).
VERL_EXTRA_INFO_FIELDS = (("split", pa.string()), ("index", pa.int64()))


def verl_problems(extra_info_fields: tuple = ()) -> pa.Schema:
    """verl's row schema, with `extra_info_fields` ((name, type) pairs) after split and index."""
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(MESSAGE)),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            ("extra_info", pa.struct(list(VERL_EXTRA_INFO_FIELDS) + list(extra_info_fields))),
        ]
    )


# One row per problem read from the user's file: what the later stages need, plus where the
# original row lives so that selection can emit it unchanged.
PROBLEMS = pa.schema(
    [
        ("problem_id", pa.string()),
        ("source_row", pa.int64()),
        ("data_source", pa.string()),
        ("reward_style", pa.string()),
        ("ground_truth", pa.string()),
        ("prompt_messages_json", pa.string()),  # chat list as JSON, or a plain string prompt as JSON
        ("extra_info_json", pa.string()),
    ]
)

# One row per generated response. Token ids are exactly what the engine produced: the
# gradient stage never re-tokenizes text.
ROLLOUTS = pa.schema(
    [
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
    ]
)

# One row per problem and feature spec: what `gradsel select` ranks on.
SCORES = pa.schema(
    [
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
        # Distinct answer classes paid (reward above 0), and whether that breaks the judge's contract: a
        # binary one-reference judge (rewards.promises_one_answer) pays at most one. Null in stores
        # scored before the contract was recorded; `select` reads null as unbroken.
        ("paid_answers", pa.int32()),
        ("breaks_contract", pa.bool_()),
    ]
)

VECTOR_DTYPES = ("float16", "float32")


def vectors_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    """Per-problem gradient features: the unit direction, the gradient's L2 norm beside it, and,
    under an in-pass alignment, the exact inner product with the validation gradient.

    The direction is one fixed-size binary value per row: `dim` little-endian floats of `dtype`,
    which the field's metadata names. Parquet stores it as one fixed-length byte array a row, so
    reading a shard is a copy and a view, where the fixed-size list of floats of stores made
    before format version 2 made Parquet decode levels for every element (docs/store.md). Those
    read as they did (`stored_vectors`)."""
    if dtype not in VECTOR_DTYPES:
        raise ValueError(f"vector dtype {dtype!r}: choose one of {VECTOR_DTYPES}")
    vector = pa.field(
        "vector", pa.binary(dim * np.dtype(dtype).itemsize), nullable=False, metadata={"dtype": dtype, "dim": str(dim)}
    )
    return pa.schema([("problem_id", pa.string()), vector, ("norm", pa.float64()), ("target_dot", pa.float64())])


def vectors_table(ids, unit: np.ndarray, norms, dots=None, dtype: str = "float16") -> pa.Table:
    """A vector shard's table (vectors_schema) from (n, dim) unit vectors, their norms and, when
    given, their dots with the validation gradient."""
    unit = np.ascontiguousarray(unit, dtype=np.dtype(dtype).newbyteorder("<"))
    n, dim = unit.shape
    schema = vectors_schema(dim, dtype)
    vectors = pa.FixedSizeBinaryArray.from_buffers(schema.field("vector").type, n, [None, pa.py_buffer(unit.tobytes())])
    return pa.table(
        [
            pa.array(list(ids), pa.string()),
            vectors,
            pa.array(np.asarray(norms, np.float64)),
            pa.array(dots, pa.float64()) if dots is not None else pa.nulls(n, pa.float64()),
        ],
        schema=schema,
    )


def vector_layout(field: pa.Field) -> tuple[int, str]:
    """(dim, dtype) of a stored vector column, in either format."""
    if pa.types.is_fixed_size_binary(field.type):
        meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
        return int(meta["dim"]), meta["dtype"]
    return field.type.list_size, str(field.type.value_type.to_pandas_dtype().__name__)  # before version 2


def stored_vectors(column, field: pa.Field) -> np.ndarray:
    """(rows, dim) vectors of a stored column (an Array of one batch), in their stored dtype,
    without copying where the layout allows."""
    dim, dtype = vector_layout(field)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_fixed_size_binary(column.type):
        flat = np.frombuffer(
            column.buffers()[1],
            dtype=np.dtype(dtype).newbyteorder("<"),
            count=len(column) * dim,
            offset=column.offset * dim * np.dtype(dtype).itemsize,
        )
    else:
        flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), dim)


# How vector shards are written: without dictionary encoding or compression, in row groups of
# about 64 MiB. Gradient entries neither repeat nor compress, and Parquet tries a dictionary of
# every value before falling back (docs/store.md). A reader decodes a whole row group at once:
# one per shard would be 1 GiB at 8,192 dimensions.
VECTOR_PARQUET_OPTIONS = {"use_dictionary": False, "compression": "none"}
VECTOR_ROW_GROUP_BYTES = 64 * 2**20


def parquet_options(schema: pa.Schema) -> dict:
    """pyarrow.parquet.write_table options for a table of this schema."""
    if "vector" not in schema.names:
        return {}
    dim, dtype = vector_layout(schema.field("vector"))
    row_bytes = dim * np.dtype(dtype).itemsize
    return VECTOR_PARQUET_OPTIONS | {"row_group_size": max(1024, VECTOR_ROW_GROUP_BYTES // row_bytes)}


# One row per round and offered problem (`refresh`): what each round scored and selected.
HISTORY = pa.schema(
    [
        ("round", pa.int32()),
        ("problem_id", pa.string()),
        ("checkpoint", pa.string()),  # content hash of the round's snapshot
        ("score_cos", pa.float64()),
        ("pass_rate", pa.float64()),
        ("selected", pa.bool_()),
    ]
)


# One row per suspect of `gradsel audit --out`: each signal's evidence and the proposed key (gradsel.review.audit.Evidence).
AUDIT_EVIDENCE = pa.schema(
    [
        ("problem_id", pa.string()),
        ("source_row", pa.int64()),
        ("data_source", pa.string()),
        ("key", pa.string()),
        ("n_rollouts", pa.int32()),
        ("key_share", pa.float64()),
        ("plurality_answer", pa.string()),
        ("plurality_share", pa.float64()),
        ("plurality_paid", pa.bool_()),
        ("rollout_signal", pa.float64()),
        ("rounds", pa.int32()),
        ("key_share_trend", pa.float64()),
        ("plurality_share_trend", pa.float64()),
        ("history_signal", pa.float64()),
        ("duplicate_keys", pa.list_(pa.string())),
        ("duplicate_signal", pa.float64()),
        ("taught_logp_key", pa.float64()),
        ("taught_logp_alternative", pa.float64()),
        ("taught_alternative", pa.string()),
        ("taught_signal", pa.float64()),
        ("suspicion", pa.float64()),
        ("proposed_key", pa.string()),
        ("suspect", pa.bool_()),
    ]
)
