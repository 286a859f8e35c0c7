"""``python -m careflow`` runs the CLI."""

from careflow.cli import main

main()
