"""`python -m dicomflow` runs the `dicomflow` command."""

from dicomflow.cli.main import run

run()
