# The MLflow tracking server of the production stack. The official image ships neither a PostgreSQL
# driver nor boto3 (mlflow/mlflow#9513), which a PostgreSQL backend and S3 artifacts need.
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" "boto3>=1.36" \
    && useradd --create-home --uid 10001 mlflow
USER mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host=0.0.0.0", "--port=5000"]
