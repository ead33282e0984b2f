#!/bin/sh
# Runs once, when the Postgres data volume is first initialised (docker-entrypoint-initdb.d):
# creates the database holding MLflow's basic-auth users and permissions next to the tracking one.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE mlflow_auth OWNER "$POSTGRES_USER";
SQL
