"""``retfm index build`` and ``retfm retrieve``: find past cases similar to new fundus photographs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from retfm.cli.common import config_command, console, print_table, progress_bar, stdout, write_json
from retfm.retrieval.config import IndexConfig

index_app = typer.Typer(help="Similar-case search indexes over embeddings (FAISS).", no_args_is_help=True)


@index_app.command("build")
@config_command(IndexConfig, "kind", "split", "nlist", "nprobe", "hnsw_m", "ef_search")
def build(
    config: IndexConfig,
    embeddings: Path = typer.Option(..., "--embeddings", help="embeddings Parquet from `retfm embed`"),
    out: Path = typer.Option(..., "--out", help="index folder to write (index.faiss, items.parquet, index.json)"),
) -> None:
    """Build a cosine-similarity index over an embeddings file, for `retfm retrieve`."""
    from retfm.retrieval.index import build_index

    with console.status("building the index"):
        index = build_index(embeddings, out, config)
    stdout.print(f"indexed {len(index)} images ({index.meta['kind']}, vectors of size {index.dim}, model "
                 f"{index.meta.get('model')}) in {out}")


def retrieve(
    index: Path = typer.Option(..., "--index", help="index folder from `retfm index build`"),
    embeddings: Path = typer.Option(None, "--embeddings", help="query embeddings Parquet (same model as the index)"),
    image: Path = typer.Option(None, "--image", help="one fundus photograph to query with"),
    data: Path = typer.Option(None, "--data", help="ingest folder (or manifest) of query images"),
    text: str = typer.Option(None, "--text", help="a description to search for, e.g. 'optic disc cupping' (an "
                                                  "index of image-text embeddings, from `retfm zeroshot`)"),
    split: str = typer.Option(None, "--split", help="use only this split of the --embeddings or --data queries"),
    k: int = typer.Option(5, "--k", min=1, help="neighbours per query"),
    out: Path = typer.Option(None, "--out", help="write the neighbours: .parquet or .csv"),
    evaluate: bool = typer.Option(False, "--evaluate", help="Precision@1/3/5 and mAP@10 against --label "
                                                            "(no queries given: leave-one-out on the index)"),
    label: str = typer.Option(None, "--label", help="label column that makes a neighbour relevant (--evaluate)"),
    metrics: Path = typer.Option(None, "--metrics", help="write the evaluation as JSON here (--evaluate)"),
    keep_same_patient: bool = typer.Option(False, "--keep-same-patient",
                                           help="also return the query's patient's other images (skipped by "
                                                "default, when patient_id is known)"),
    model: str = typer.Option(None, "--model", help="--image/--data/--text: where the index's model is now, if it moved "
                                                    "(default: as recorded in the index)"),
    weights: str = typer.Option(None, "--weights", help="--image/--data: where the index's weights are now, if "
                                                        "they moved (default: as recorded); other weights are refused"),
    device: str = typer.Option(None, "--device", help="--image/--data: where the queries are embedded, as for "
                                                      "`retfm embed --device`"),
    workers: int = typer.Option(None, "--workers", help="--image/--data: decoding processes, as for `retfm embed "
                                                        "--workers`"),
) -> None:
    """Find the indexed images most similar to query images (cosine similarity of embeddings)."""
    from retfm.errors import RetfmError
    import pandas as pd

    from retfm.retrieval.index import RetrievalIndex, embed_queries, embed_text, evaluate_retrieval, read_queries

    given = [name for name, value in (("--embeddings", embeddings), ("--image", image), ("--data", data),
                                      ("--text", text)) if value]
    if len(given) > 1:
        raise RetfmError(f"give one query source, not {' and '.join(given)}")
    if not given and not evaluate:
        raise RetfmError("give --embeddings, --image, --data or --text (or --evaluate --label COL for leave-one-out "
                         "on the index)")
    if evaluate and not label:
        raise RetfmError("--evaluate needs --label COL: the column whose equal values make a neighbour relevant")
    if (label or metrics) and not evaluate:
        raise RetfmError("--label and --metrics belong to --evaluate")
    if out is not None and not given:
        raise RetfmError("--out writes the neighbours of queries: give --embeddings, --image or --data")
    if evaluate and (image or text):
        raise RetfmError("--evaluate needs labelled queries: --embeddings or --data, or none for leave-one-out")
    if out is not None and out.suffix.lower() not in (".parquet", ".csv"):
        raise RetfmError(f"{out}: --out must end in .parquet or .csv")

    idx = RetrievalIndex.load(index)
    queries = None
    if embeddings:
        queries = read_queries(idx, embeddings, split)
    elif text:
        queries = pd.DataFrame({"image_id": ["text"]}), embed_text(idx, text, model)
    elif image or data:
        with progress_bar("embed queries", unit="img") as (total, advance):
            queries = embed_queries(idx, image=image, data=data, split=split, model=model, weights=weights,
                                    device=device, workers=workers, progress=advance, total=total)

    if queries is not None:
        table, vectors = queries
        patients = table["patient_id"] if "patient_id" in table and not keep_same_patient else None
        hits = idx.search(vectors, k, query_ids=None if image or text else table["image_id"],
                          query_patients=patients)
        hits.insert(0, "query_image_id", table["image_id"].to_numpy()[hits["query"].to_numpy()])
        hits = hits.drop(columns=["query"])
        if len(table) == 1:
            _print_neighbours(hits, idx.meta.get("label_columns") or [])
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.suffix.lower() == ".csv":
                hits.to_csv(out, index=False)
            else:
                hits.to_parquet(out, index=False)
            stdout.print(f"{len(table)} queries, {len(hits)} neighbours written to {out}")
        elif len(table) > 1 and not evaluate:
            stdout.print(f"{len(table)} queries: pass --out FILE to write their neighbours")

    if evaluate:
        result = evaluate_retrieval(idx, label, queries, exclude_same_patient=not keep_same_patient)
        _print_metrics(result)
        if metrics is not None:
            write_json(metrics, result)
            stdout.print(f"wrote {metrics}")


def _print_neighbours(hits, label_columns: list[str]) -> None:
    import pandas as pd

    columns = ["rank", "similarity", "image_id", *[c for c in ("site", "split") if c in hits], *label_columns]
    table = Table(title="most similar indexed images")
    for column in columns:
        table.add_column(column, justify="right" if column in ("rank", "similarity") else "left")
    for _, row in hits.iterrows():
        table.add_row(*[f"{row[c]:.4f}" if c == "similarity" else ("" if pd.isna(row[c]) else str(row[c]))
                        for c in columns])
    print_table(table)


def _print_metrics(result: dict) -> None:
    depth = result["map_depth"]
    names = ["precision_at_1", "precision_at_3", "precision_at_5", f"map_at_{depth}", "prior"]
    table = Table(title=f"retrieval of {result['label']!r} ({result['mode']}, {result['n_queries']} queries, "
                        f"same patient {'skipped' if result['exclude_same_patient'] else 'kept'})")
    table.add_column(result["label"])
    table.add_column("n", justify="right")
    for heading in ("P@1", "P@3", "P@5", f"mAP@{depth}", "prior"):
        table.add_column(heading, justify="right")
    rows = [("all", result["overall"]), *result["per_label"].items()]
    for name, values in rows:
        table.add_row(name, str(values["n"]), *["-" if values[m] is None else f"{values[m]:.3f}" for m in names])
    print_table(table)

