#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised: the databases of Prefect and Optuna
# beside MLflow's (POSTGRES_DB). Each tool creates and migrates its own tables.
set -eu
for db in prefect optuna; do
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
        -c "CREATE DATABASE $db OWNER \"$POSTGRES_USER\""
done
