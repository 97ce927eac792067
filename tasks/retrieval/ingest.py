"""Ingestion: files → chunks (by tokens of the embedder) → embeddings → a collection.

    report = ingest_documents(cfg, paths, Path("handbook/"), "handbook")
    # IngestReport(added=120, updated=3, removed=1, unchanged=880, version="5c0f…")

Files: text and Markdown (whole file), JSONL (one document per line: its `text`, `passage`,
`content` or `document` field, with `title` in front when there is one), PDF (pypdf, page by
page). A folder is read recursively in name order; files of other kinds in it are skipped and
counted. A source is named by its path under what was ingested (a JSONL row adds `#<id>` or
`#L<line>`), so ingesting the same folder from elsewhere names the same chunks.

Re-ingesting embeds only chunks whose text changed or is new (by id and content hash), removes
the chunks of an ingested source that it no longer has — and, when the folder the collection was
first built from is ingested again, the chunks of files gone from it — and leaves other sources
alone. Chunks
are written batch by batch: a crashed ingest loses nothing it wrote, and the next run embeds
only what is still missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneloop.config import CollectionsConfig
from tuneloop.embedder import load_embedder, sentence_transformer
from tuneloop.vectorstore import Chunk, CollectionError, CollectionStore, Location, chunk_id, content_hash

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".pdf")
JSONL_FIELDS = ("text", "passage", "content", "document")
EMBED_BATCH = 256
MAX_TOKENS = 512  # the embedder's own cut-off applies below this (MiniLM: 256)


class DocumentError(ValueError):
    """A file that cannot be read as documents; says which file (and line) and why."""


@dataclass
class IngestReport:
    collection: str
    version: str
    documents: int
    chunks: int
    added: int
    updated: int
    removed: int
    unchanged: int
    skipped_files: list[str] = field(default_factory=list)
    indexed: bool = False

    @property
    def embedded(self) -> int:
        return self.added + self.updated


def load_documents(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(source, text) of every document under `path`, and the files skipped (not a known kind)."""
    path = Path(path)
    if not path.exists():
        raise DocumentError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DocumentError(f"{path}: unknown kind of file {path.suffix!r}; ingest {', '.join(SUFFIXES)}")
        return _read(path, path.name), []
    docs: list[tuple[str, str]] = []
    skipped: list[str] = []
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        name = file.relative_to(path).as_posix()
        if file.suffix.lower() in SUFFIXES:
            docs += _read(file, name)
        else:
            skipped.append(name)
    return docs, skipped


def _read(file: Path, name: str) -> list[tuple[str, str]]:
    suffix = file.suffix.lower()
    try:
        if suffix in TEXT_SUFFIXES:
            return [(name, file.read_text(encoding="utf-8"))]
        if suffix == ".pdf":
            return [(name, _pdf_text(file))]
    except UnicodeDecodeError as err:
        raise DocumentError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    docs = []
    with file.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DocumentError(f"{file}:{n}: not JSON ({err.msg})") from None
            text = next((row[k] for k in JSONL_FIELDS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
            if text is None:
                raise DocumentError(f"{file}:{n}: no text field (one of {', '.join(JSONL_FIELDS)})")
            title = row.get("title")
            key = row.get("id")
            source = f"{name}#{key}" if isinstance(key, (str, int)) else f"{name}#L{n}"
            docs.append((source, f"{title}\n\n{text}" if isinstance(title, str) and title else text))
    return docs


def _pdf_text(file: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(str(file))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PyPdfError, ValueError, KeyError, TypeError) as err:  # broken, truncated or encrypted
        raise DocumentError(f"{file}: cannot read as PDF: {err}") from None


def chunk_text(text: str, source: str, tokenizer, size: int, overlap: int) -> list[Chunk]:
    """Windows of `size` tokens (of the embedder's tokenizer) stepping by size - overlap, each the
    exact span of the original text it covers."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = encoded["offset_mapping"]
    if not offsets:
        return []
    chunks, start, position = [], 0, 0
    while True:
        window = offsets[start : start + size]
        piece = text[window[0][0] : window[-1][1]].strip()
        if piece:
            chunks.append(Chunk(chunk_id(source, position), piece, source, position, content_hash(piece)))
            position += 1
        if start + size >= len(offsets):
            return chunks
        start += size - overlap


@task(name="ingest-documents", cache_policy=NO_CACHE)
def ingest_documents(cfg: CollectionsConfig, root: Location, path: Path, name: str) -> IngestReport:
    """Bring a collection up to date with the documents under `path` (see the module's docstring)."""
    from tasks.evaluate import report_progress

    docs, skipped = load_documents(path)
    if not docs:
        raise DocumentError(f"{path}: no documents ({', '.join(SUFFIXES)}); skipped {len(skipped)} other files")
    st = sentence_transformer(cfg.embedder, MAX_TOKENS)
    size = min(cfg.chunk_tokens, int(st.max_seq_length) - 2)  # room for the embedder's own [CLS] and [SEP]
    chunks = [c for source, text in docs for c in chunk_text(text, source, st.tokenizer, size, cfg.chunk_overlap)]
    if len({c.id for c in chunks}) != len(chunks):
        raise CollectionError(f"{path}: two documents share a source name (a JSONL id given twice?)")
    store = CollectionStore.create_or_open(root, name, cfg.embedder, int(st.get_embedding_dimension()))
    # Ingesting the folder the collection was built from mirrors it: a file gone from it loses its
    # chunks. Ingesting other files adds to the collection and leaves the rest alone.
    where = str(Path(path).expanduser().resolve())
    mirror = Path(path).is_dir() and store.meta.get("source_path") == where
    existing = store.hashes(None if mirror else sorted({c.source for c in chunks}))
    todo = [c for c in chunks if existing.get(c.id, ("", ""))[1] != c.content_hash]
    stale = sorted(set(existing) - {c.id for c in chunks})
    embed = load_embedder(cfg.embedder, MAX_TOKENS)
    for i in range(0, len(todo), EMBED_BATCH):
        batch = todo[i : i + EMBED_BATCH]
        store.upsert(batch, embed([c.text for c in batch]))
        report_progress("ingest", min(i + EMBED_BATCH, len(todo)), len(todo), f"embedding chunks of {name}")
    store.delete(stale)
    indexed = store.reindex()
    store.record(
        chunk_tokens=size,
        chunk_overlap=cfg.chunk_overlap,
        documents=len(store_sources(store)),
        **({"source_path": where} if Path(path).is_dir() and (mirror or not store.meta.get("source_path")) else {}),
    )
    updated = sum(1 for c in todo if c.id in existing)
    report = IngestReport(
        name,
        store.version,
        len(docs),
        len(store),
        len(todo) - updated,
        updated,
        len(stale),
        len(chunks) - len(todo),
        skipped,
        indexed,
    )
    log.info(
        "collection %s v%s: %d added, %d updated, %d removed, %d unchanged (%d chunks)",
        name,
        report.version,
        report.added,
        report.updated,
        report.removed,
        report.unchanged,
        report.chunks,
    )
    return report


def store_sources(store: CollectionStore) -> set[str]:
    return {source for source, _ in store.hashes().values()}


@task(name="check-collections", cache_policy=NO_CACHE)
def collection_staleness(cfg: CollectionsConfig, root: Location) -> dict[str, dict[str, int]] | str | None:
    """Per collection built from a folder: the chunks ingesting that folder again would add, update
    and remove (all 0: up to date). Nothing is embedded or written. None: no such collection. A
    string: the collection server cannot be reached — said, so a monitoring run still checks drift."""
    from tuneloop.vectorstore import list_collections
    from tuneloop.vectorstore_pg import CollectionUnavailable

    try:
        return _staleness(cfg, root, list_collections(root))
    except CollectionUnavailable as err:
        return str(err)


def _staleness(cfg: CollectionsConfig, root: Location, names: list[str]) -> dict[str, dict[str, int]] | None:
    out: dict[str, dict[str, int]] = {}
    for name in names:
        store = CollectionStore.open(root, name)
        folder = store.meta.get("source_path")
        if not folder:
            continue
        try:
            docs, _ = load_documents(Path(folder))
        except DocumentError:
            docs = []  # the folder is gone: every chunk is stale
        st = sentence_transformer(store.meta["embedder"], MAX_TOKENS)
        size, overlap = int(store.meta.get("chunk_tokens", cfg.chunk_tokens)), int(store.meta.get("chunk_overlap", 0))
        now = {c.id: c.content_hash for s, t in docs for c in chunk_text(t, s, st.tokenizer, size, overlap)}
        then = {i: h for i, (_, h) in store.hashes().items()}
        out[name] = {
            "added": len(now.keys() - then.keys()),
            "updated": sum(1 for i in now.keys() & then.keys() if now[i] != then[i]),
            "removed": len(then.keys() - now.keys()),
        }
    return out or None
