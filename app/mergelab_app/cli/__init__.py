"""The ``mergelab`` command line (Typer). ``mergelab --help`` lists every command.

Each command parses its options, calls one function of the library and prints: the commands
live in :mod:`~mergelab_app.cli.models` (the user's adapters), :mod:`~mergelab_app.cli.studies` (studies,
notebooks) and :mod:`~mergelab_app.cli.stores` (the store, the embedded benchmark); the app, the
shared options and the progress display in :mod:`~mergelab_app.cli.app`. Bad input
(:class:`~mergelab.errors.InputError`) prints one line on stderr and exits with code 2.
"""

from mergelab_app.cli import models, stores, studies  # noqa: F401  (each registers its commands on the app)
from mergelab_app.cli.app import app, main

__all__ = ["app", "main"]
