"""Retrieval: documents into collections (ingest), and what retrieval is measured by."""
