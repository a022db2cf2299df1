"""Options of ``retfm index build``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from retfm.config import Options


class IndexConfig(Options):
    """Options of ``retfm index build`` (see docs/retrieval.md)."""

    kind: Literal["auto", "exact", "ivf", "hnsw"] = Field("auto", description="auto: exact below 100,000 vectors, "
                                                                               "hnsw above")
    split: Literal["train", "val", "test"] | None = Field(None, description="index one split only; null: all rows")
    nlist: int | None = Field(None, ge=1,
                              description="ivf: number of k-means lists (null: 4*sqrt(N), at most N/39)")
    nprobe: int = Field(16, ge=1, description="ivf: lists searched per query")
    hnsw_m: int = Field(32, ge=4, le=256, description="hnsw: links per vector in the graph")
    ef_construction: int = Field(80, ge=8, description="hnsw: candidates kept while building the graph")
    ef_search: int = Field(64, ge=1, description="hnsw: candidates kept while searching")

