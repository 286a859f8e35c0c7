"""``python -m careflow.cli`` runs the CLI."""

from careflow.cli import main

main()
