"""Arrow schemas of the shard format (version 1) and of the embeddings table (see DESIGN.md)."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"


def shard_schema(num_points: int) -> pa.Schema:
    """Schema of one shard file; ``points`` is a fixed-size list of ``3 * num_points`` floats."""
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("subject_id", pa.string(), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
            pa.field("dataset", pa.string(), nullable=False),
            pa.field("image", pa.binary(), nullable=False),
            # yaw is nullable: a data set without per-image pose (ARL-VTF pose sequences) stores null
            pa.field("yaw_deg", pa.float32()),
            pa.field("pitch_deg", pa.float32()),
            pa.field("expression", pa.string()),
            pa.field("points", pa.list_(pa.float32(), 3 * num_points)),
            pa.field("num_points", pa.int32(), nullable=False),
        ]
    )


#: columns every shard must have, in order
SHARD_COLUMNS = tuple(shard_schema(1).names)


def embedding_schema(dim: int) -> pa.Schema:
    """Schema of the embeddings table written by ``posefr embed`` and read by ``posefr verify``."""
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("subject_id", pa.string(), nullable=False),
            pa.field("yaw_deg", pa.float32()),
            pa.field("enrollment", pa.bool_(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


EMBEDDING_COLUMNS = tuple(embedding_schema(1).names)
