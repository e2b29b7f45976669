"""``python -m mergelab_app``: the same as the ``mergelab`` command."""

from mergelab_app.cli import main

main()
