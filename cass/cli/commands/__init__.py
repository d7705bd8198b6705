"""One module per command group. Each handler takes the parsed arguments, calls the library once and prints
the result; the libraries it needs (torch, MLflow, Prefect, ...) are imported inside it, so that parsing,
``--help`` and the light commands never load them."""
