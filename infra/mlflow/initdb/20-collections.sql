-- Run once by the postgres image on an empty data volume: the team's document collections
-- (tuneloop.vectorstore_pg; `collections.store` in configs/team.yaml) live in a database of their
-- own, with the pgvector extension the image ships, created here by the owner.
CREATE DATABASE collections;
\connect collections
CREATE EXTENSION IF NOT EXISTS vector;
