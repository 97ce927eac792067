-- Run once by the postgres image on an empty data volume: the basic-auth app's user store
-- lives in a database of its own (its schema migrations are separate from the tracking store's).
CREATE DATABASE mlflow_auth;
