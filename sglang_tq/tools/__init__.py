"""Command-line tools a user runs beside the server, installed with the package:
``python -m sglang_tq.tools.<name> --help``."""
