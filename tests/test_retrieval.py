"""Collections for real: files chunked by the embedder's tokens, embedded by the builtin MiniLM,
stored in LanceDB on disk and (the same tests, marked slow) in pgvector on a real PostgreSQL
server; re-ingestion embeds only what changed; prompts that retrieve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.retrieval.ingest import DocumentError, chunk_text, ingest_documents, load_documents
from tuneloop.config import CollectionsConfig
from tuneloop.embedder import sentence_transformer
from tuneloop.prompts import PromptSpec, PromptVariablesError, Retrieval
from tuneloop.retrieval import Retriever, render_prompt
from tuneloop.vectorstore import CollectionError, CollectionStore, is_server, list_collections

EMBEDDER = "builtin:all-minilm-l6-v2"

# A one-page PDF whose page says "Refunds take ten days." (hand-written objects; pypdf reads it).
_STREAM = b"BT /F1 12 Tf 72 720 Td (Refunds take ten days.) Tj ET"
_OBJECTS = [
    b"<< /Type /Catalog /Pages 2 0 R >>",
    b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
    b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
    b"<< /Length %d >>\nstream\n" % len(_STREAM) + _STREAM + b"\nendstream",
    b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
]


def tiny_pdf() -> bytes:
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(_OBJECTS, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(_OBJECTS) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(_OBJECTS) + 1, xref)
    return bytes(out)


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "handbook"
    (folder / "policies").mkdir(parents=True)
    (folder / "policies" / "returns.md").write_text(
        "# Returns\n\nYou can return any item within 30 days of delivery for a full refund."
    )
    (folder / "office.txt").write_text("Our office in Lisbon opens at 9 am and closes at 6 pm on weekdays.")
    rows = [
        {"id": "ship-ca", "title": "Shipping", "text": "Shipping to Canada takes 5 to 7 business days."},
        {"id": "ship-jp", "title": "Shipping", "text": "Shipping to Japan takes 10 business days."},
    ]
    (folder / "faq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "refunds.pdf").write_bytes(tiny_pdf())
    (folder / "logo.png").write_bytes(b"\x89PNG")
    return folder


def test_documents_of_every_kind_are_read_and_others_skipped(docs: Path) -> None:
    found, skipped = load_documents(docs)
    assert [s for s, _ in found] == [
        "faq.jsonl#ship-ca",
        "faq.jsonl#ship-jp",
        "office.txt",
        "policies/returns.md",
        "refunds.pdf",
    ]
    assert dict(found)["faq.jsonl#ship-ca"].startswith("Shipping\n\nShipping to Canada")
    assert "Refunds take ten days." in dict(found)["refunds.pdf"]
    assert skipped == ["logo.png"]


def test_bad_files_are_refused_naming_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(DocumentError, match=r"bad.jsonl:2: no text field"):
        load_documents(bad)
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DocumentError, match=r"bad.jsonl:2: not JSON"):
        load_documents(bad)
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 this is not a pdf")
    with pytest.raises(DocumentError, match=r"broken.pdf: cannot read as PDF"):
        load_documents(broken)
    with pytest.raises(DocumentError, match=r"unknown kind of file '.docx'"):
        (tmp_path / "x.docx").write_text("x")
        load_documents(tmp_path / "x.docx")


def test_chunks_are_token_windows_with_overlap_over_the_original_text() -> None:
    tokenizer = sentence_transformer(EMBEDDER, 512).tokenizer
    text = " ".join(f"word{i}" for i in range(60))
    chunks = chunk_text(text, "a.txt", tokenizer, 40, 10)
    assert len(chunks) > 2 and all(c.text in text for c in chunks)
    first, second = (tokenizer(c.text, add_special_tokens=False)["input_ids"] for c in chunks[:2])
    assert len(first) == 40 and first[-10:] == second[:10]  # the overlap, exactly
    assert [c.position for c in chunks] == list(range(len(chunks))) and len({c.id for c in chunks}) == len(chunks)


def test_ingest_search_and_re_ingest_embed_only_what_changed(docs: Path, collections_at: Path | str) -> None:
    cfg, root = CollectionsConfig(), collections_at
    first = ingest_documents.fn(cfg, root, docs, "handbook")
    assert (first.added, first.updated, first.removed, first.unchanged) == (5, 0, 0, 0)
    assert first.skipped_files == ["logo.png"] and list_collections(root) == ["handbook"]
    again = ingest_documents.fn(cfg, root, docs, "handbook")
    assert (again.embedded, again.unchanged, again.version) == (0, 5, first.version)  # nothing embedded twice

    (docs / "office.txt").write_text("Our office moved to Porto; it opens at 8 am.")
    (docs / "faq.jsonl").write_text(json.dumps({"id": "ship-ca", "text": "Shipping to Canada takes 5 days."}) + "\n")
    (docs / "refunds.pdf").unlink()
    changed = ingest_documents.fn(cfg, root, docs, "handbook")
    # office and ship-ca changed; ship-jp and the PDF are gone from the folder the collection mirrors
    assert (changed.added, changed.updated, changed.removed, changed.unchanged) == (0, 2, 2, 1)
    assert changed.version != first.version and changed.chunks == 3

    retriever = Retriever(root)
    hits = retriever.search("handbook", "When does the Porto office open?", 2)
    before = retriever.store("handbook")
    (docs / "office.txt").write_text("Our office moved again, to Faro; it opens at 10 am.")
    ingest_documents.fn(cfg, root, docs, "handbook")  # as another process would
    if not is_server(root):  # files an ingest replaced: opened again (a server is always current)
        assert retriever.store("handbook") is not before
    assert "Faro" in retriever.search("handbook", "Where is the office now?", 1)[0].text
    (docs / "office.txt").write_text("Our office moved to Porto; it opens at 8 am.")
    ingest_documents.fn(cfg, root, docs, "handbook")
    hits = retriever.search("handbook", "When does the Porto office open?", 2)
    assert hits[0].source == "office.txt" and "Porto" in hits[0].text and hits[0].score > hits[1].score
    assert hits[0].cite() == {"id": hits[0].id, "source": "office.txt", "position": 0, "score": round(hits[0].score, 4)}


def test_a_collection_keeps_its_embedder_and_names_are_checked(collections_at: Path | str) -> None:
    CollectionStore.create_or_open(collections_at, "docs", EMBEDDER, 384)
    with pytest.raises(CollectionError, match="holds vectors of builtin:all-minilm-l6-v2, not other-model"):
        CollectionStore.create_or_open(collections_at, "docs", "other-model", 384)
    with pytest.raises(CollectionError, match="collection name '../x'"):
        CollectionStore.open(collections_at, "../x")
    with pytest.raises(CollectionError, match=r"no collection 'nope' .*collections: docs"):
        CollectionStore.open(collections_at, "nope")


def test_a_prompt_that_retrieves_fills_its_context_with_numbered_chunks(docs: Path, collections_at: Path | str) -> None:
    root = collections_at
    ingest_documents.fn(CollectionsConfig(), root, docs, "handbook")
    template = [
        {"role": "system", "content": "Answer from the context and cite it as [n].\n\n{{context}}"},
        {"role": "user", "content": "{{input}}"},
    ]
    spec = PromptSpec.from_template("support", "1", template, {"collection": "handbook", "k": 2})
    assert spec.variables == [] and spec.sha256 != PromptSpec.from_template("support", "1", template).sha256
    turns, hits = Retriever(root).render(spec, [{"role": "user", "content": "How long is shipping to Japan?"}])
    assert len(hits) == 2 and hits[0].source == "faq.jsonl#ship-jp"
    assert turns[0]["content"].endswith(f"[1] {hits[0].text}\n\n[2] {hits[1].text}")
    assert turns[1] == {"role": "user", "content": "How long is shipping to Japan?"}
    with pytest.raises(PromptVariablesError, match="retrieves from handbook: no collections here"):
        render_prompt(spec, [{"role": "user", "content": "x"}], {}, None)
    with pytest.raises(PromptVariablesError, match=r"has no \{\{context\}\}"):
        PromptSpec.from_template("support", "2", "{{input}}", Retrieval(collection="handbook"))


def test_a_collection_whose_documents_changed_is_stale(docs: Path, collections_at: Path | str) -> None:
    from tasks.retrieval.ingest import collection_staleness

    cfg, root = CollectionsConfig(), collections_at
    assert collection_staleness.fn(cfg, root) is None
    ingest_documents.fn(cfg, root, docs, "handbook")
    assert collection_staleness.fn(cfg, root) == {"handbook": {"added": 0, "updated": 0, "removed": 0}}
    (docs / "office.txt").write_text("The office moved to Porto.")
    (docs / "new.md").write_text("A new page.")
    (docs / "refunds.pdf").unlink()
    assert collection_staleness.fn(cfg, root) == {"handbook": {"added": 1, "updated": 1, "removed": 1}}


def test_retrieval_is_measured_by_recall_and_mrr_against_labelled_questions(
    docs: Path, tmp_path: Path, collections_at: Path | str
) -> None:
    from tasks.retrieval.evaluate import QuestionsError, evaluate_retrieval, read_questions, write_retrieval_report

    root = collections_at
    ingest_documents.fn(CollectionsConfig(), root, docs, "handbook")
    labelled = tmp_path / "q.jsonl"
    rows = [
        {"question": "How long does shipping to Japan take?", "relevant": ["faq.jsonl#ship-jp"]},
        {"question": "When does the Lisbon office open?", "relevant": "office.txt"},
        {"question": "What is the capital of Mongolia?", "relevant": ["atlas.md"]},  # not in the collection
    ]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate_retrieval(
        Retriever(root), "handbook", read_questions(labelled), 2, ["recall_at_k >= 0.9", "mrr >= 0.5"]
    )
    assert result.metrics["recall_at_k"] == pytest.approx(2 / 3) and [e["rank"] for e in result.examples][2] is None
    assert result.metrics["mrr"] == pytest.approx(sum(1 / e["rank"] for e in result.examples if e["rank"]) / 3)
    assert not result.passed and result.rules[0].startswith("FAIL: recall_at_k >= 0.9")
    html = write_retrieval_report(result, tmp_path / "r.html").read_text()
    assert "capital of Mongolia" in html and "data:image/png;base64," in html
    labelled.write_text('{"question": "x", "relevant": []}\n')
    with pytest.raises(QuestionsError, match=r"q.jsonl:1: `relevant` must list"):
        read_questions(labelled)


def test_an_evaluation_with_a_retrieving_prompt_answers_with_the_context_and_keeps_it(
    docs: Path, tmp_path: Path, models_dir: Path
) -> None:
    import pandas as pd

    from tasks.evaluate import EvalSlice, evaluate_model
    from tuneloop.config import load_config
    from tuneloop.models import resolve_base

    root = tmp_path / "collections"
    ingest_documents.fn(CollectionsConfig(), root, docs, "handbook")
    spec = PromptSpec.from_template(
        "support",
        "1",
        [{"role": "system", "content": "Context:\n{{context}}"}, {"role": "user", "content": "{{input}}"}],
        {"collection": "handbook", "k": 1},
    )
    rows = pd.DataFrame(
        {
            "messages": [
                [
                    {"role": "user", "content": "How long is shipping to Japan?"},
                    {"role": "assistant", "content": "10 days"},
                ]
            ]
        }
    )
    cfg = load_config(None, ["eval.bias.categories=[]", "eval.max_new_tokens=2", "gate.rules=['token_f1 >= 0']"])
    base = resolve_base("builtin:tiny-llama", models_dir)
    result = evaluate_model.fn(
        base,
        [EvalSlice("geo", 1, "d1", rows)],
        cfg.eval,
        "base",
        tmp_path / "cache",
        prompt=spec,
        retriever=Retriever(root),
    )
    (example,) = result.reports["geo"].examples
    assert example["context"].startswith("[1] Shipping\n\nShipping to Japan")
    assert example["messages"][0]["content"] == f"Context:\n{example['context']}"
    with pytest.raises(PromptVariablesError, match="no collections here"):
        evaluate_model.fn(base, [EvalSlice("geo", 1, "d1", rows)], cfg.eval, "base", prompt=spec)


def test_a_collection_server_that_cannot_be_reached_says_where_and_never_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.postgres import free_port
    from tuneloop.vectorstore_pg import CollectionUnavailable

    monkeypatch.setenv("PGPASSWORD", "s3cret-pw")
    port = free_port()  # nothing listens there
    with pytest.raises(CollectionUnavailable, match=rf"collection server 127.0.0.1:{port}/team: ") as err:
        CollectionStore.open(f"postgresql://tuneloop@127.0.0.1:{port}/team", "docs")
    assert "s3cret" not in str(err.value)
    with pytest.raises(CollectionUnavailable):  # the gateway answers CollectionError with a 503
        list_collections(f"postgresql://tuneloop@127.0.0.1:{port}/team")
    from tasks.retrieval.ingest import collection_staleness

    # monitoring says so and goes on checking drift (the `collections` signal alerts with it)
    said = collection_staleness.fn(CollectionsConfig(), f"postgresql://tuneloop@127.0.0.1:{port}/team")
    assert isinstance(said, str) and f"127.0.0.1:{port}/team" in said


def test_the_config_names_a_collection_server_without_its_password() -> None:
    from pydantic import ValidationError

    assert CollectionsConfig(store="postgresql://tuneloop@db:5432/team").store == "postgresql://tuneloop@db:5432/team"
    with pytest.raises(ValidationError, match="PGPASSWORD or ~/.pgpass"):
        CollectionsConfig(store="postgresql://tuneloop:hunter2@db/team")
    with pytest.raises(ValidationError, match="PGPASSWORD or ~/.pgpass"):
        CollectionsConfig(store="postgresql://db/team?password=hunter2")
    with pytest.raises(ValidationError, match="must be a postgresql:// URI"):
        CollectionsConfig(store="/srv/collections")


@pytest.mark.slow
def test_a_server_without_pgvector_is_refused_before_anything_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.postgres import debian_bindir, running_postgres
    from tuneloop.vectorstore_pg import CollectionUnavailable

    # Debian's PostgreSQL (as .ci/run installs it) has no pgvector: a real server without the extension.
    with running_postgres(debian_bindir(), "tuneloop", "Debian's postgresql is not installed") as server:
        server.create_database("plain")
        monkeypatch.setenv("PGPASSWORD", server.password)
        with pytest.raises(CollectionUnavailable, match="has no pgvector extension.*pgvector/pgvector image"):
            CollectionStore.create_or_open(server.uri("plain", driver=""), "docs", EMBEDDER, 384)
        assert server.query("plain", "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


@pytest.mark.slow
def test_the_team_database_script_makes_a_collection_store(pgvector_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """infra/mlflow/initdb/20-collections.sql, run by psql as the postgres image runs it, on a real
    PostgreSQL with pgvector: the database it makes holds collections."""
    import subprocess

    from tests.postgres import pgvector_bindir
    from tuneloop.config import REPO_ROOT, load_config

    server = pgvector_server
    script = REPO_ROOT / "infra" / "mlflow" / "initdb" / "20-collections.sql"
    dsn = f"host=127.0.0.1 port={server.port} user={server.user} dbname=postgres"
    env = {"PGPASSWORD": server.password, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [str(pgvector_bindir() / "psql"), dsn, "-v", "ON_ERROR_STOP=1", "-f", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert server.query("collections", "SELECT extname FROM pg_extension WHERE extname = 'vector'") == [("vector",)]
    team = load_config(REPO_ROOT / "configs" / "team.yaml").collections.store
    assert team is not None and team.endswith("/collections")  # the database the script makes
    monkeypatch.setenv("PGPASSWORD", server.password)
    store = CollectionStore.create_or_open(server.uri("collections", driver=""), "handbook", EMBEDDER, 384)
    assert len(store) == 0 and list_collections(server.uri("collections", driver="")) == ["handbook"]
