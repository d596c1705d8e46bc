"""`python -m cdlcodec` runs the same command line as `cdlcodec`."""
from cdlcodec.cli.main import main

main()
