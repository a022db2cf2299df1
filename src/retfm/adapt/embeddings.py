"""The embeddings file (docs/adapt.md): Parquet with ``image_id``, ``embedding`` (fixed-size list of
float32) and manifest columns; ``retfm.*`` schema metadata naming the model, its weights' hash and the
preprocessing. Written by ``retfm embed``, read by ``retfm probe`` and the other heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retfm.errors import RetfmError


def read_embeddings(path: Path) -> tuple[pd.DataFrame, np.ndarray, dict[str, str]]:
    """(the table without the vectors, the vectors as an N x D float32 array, the metadata)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise RetfmError(f"{path}: cannot read embeddings ({exc})") from None
    if "embedding" not in table.column_names or "image_id" not in table.column_names:
        raise RetfmError(f"{path}: not an embeddings file (needs image_id and embedding columns)")
    column = table.column("embedding").combine_chunks()
    kind = column.type
    numbers = (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) and (
        pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type))
    if not numbers or not len(table) or column.null_count or len(pc.unique(pc.list_value_length(column))) > 1:
        raise RetfmError(f"{path}: column embedding must hold one vector of numbers per row, all of one length "
                         f"(found {len(table)} row(s) of {kind})")
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), -1).astype(np.float32, copy=False)
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.startswith(b"retfm.")}
    return table.drop_columns(["embedding"]).to_pandas(), vectors, metadata


def vector_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
