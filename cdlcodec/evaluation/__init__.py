"""Bitrate-vs-accuracy evaluation: sweeps, tables, plots and the CI regression gate."""
