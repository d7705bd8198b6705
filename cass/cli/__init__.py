"""The ``cass`` command line: thin wrappers over the stage functions.

Every command reads ``params.yaml`` (``--params``) and accepts ``--set section.key=value`` overrides,
validated exactly like the file. Errors print one clear message and exit non-zero.

    parser.py     the commands and their options; each names its handler (``set_defaults(func=...)``)
    app.py        main(): parse, log, relaunch under torchrun for --nproc, run the handler, exit codes
    settings.py   the settings of a command, read and validated once; the outputs layout
    output.py     console output shared by several commands
    commands/     the handlers, one module per command group; each imports the heavy libraries it
                  needs (torch, MLflow, Prefect) inside itself, so parsing and --help load none of them
"""

from cass.cli.app import main
from cass.cli.parser import build_parser

__all__ = ["build_parser", "main"]
