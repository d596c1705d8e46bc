"""The click command line (installed as `cdlcodec.cli`); `main.py` holds the entry point."""
