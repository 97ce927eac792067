"""Collection flow: documents into a collection of the embedded vector store.

    tuneloop docs ingest handbook/ --collection handbook     # CLI
    ingest_collection_flow(cfg, "handbook/", "handbook")

Runs as a Prefect deployment too (`collection-ingest`: a form with the path and the
collection): the run's artifact says what was added, updated, removed and left, and the
collection's new version.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.retrieval.ingest import IngestReport, ingest_documents
from tuneloop.config import TuneloopConfig, load_config
from tuneloop.state import state_paths
from tuneloop.vectorstore import check_name


@flow(name="collection-ingest-flow")
def ingest_collection_flow(config: TuneloopConfig | None = None, path: str = "", collection: str = "") -> IngestReport:
    """Bring a collection up to date with the documents under `path` (files, or a folder)."""
    cfg = config or load_config()
    check_name(collection)
    paths = state_paths(cfg).ensure()
    paths.collections.mkdir(parents=True, exist_ok=True)
    report = ingest_documents(cfg.collections, paths.collections, Path(path).expanduser(), collection)
    get_run_logger().info(
        "collection %s version %s: %d chunks (%d embedded, %d removed, %d unchanged)",
        report.collection,
        report.version,
        report.chunks,
        report.embedded,
        report.removed,
        report.unchanged,
    )
    create_markdown_artifact(
        key=f"collection-{collection}".replace("_", "-"),
        markdown=(
            f"# Collection `{collection}` version `{report.version}`\n\n"
            "| documents | chunks | added | updated | removed | unchanged | skipped files |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {report.documents} | {report.chunks} | {report.added} | {report.updated} | {report.removed} | "
            f"{report.unchanged} | {len(report.skipped_files)} |\n\n"
            f"Embedder `{cfg.collections.embedder}`, {cfg.collections.chunk_tokens}-token chunks overlapping by "
            f"{cfg.collections.chunk_overlap}; source `{path}`."
        ),
        description=f"ingest into {collection}",
    )
    return report
