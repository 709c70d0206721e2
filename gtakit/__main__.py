"""`python -m gtakit ...` = the `gtakit` command (where the package is on PYTHONPATH but not installed)."""

from gtakit.cli.main import app

app()
