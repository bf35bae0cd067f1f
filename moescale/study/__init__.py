"""Scaling studies: specs, runs, results, statistics, scaling laws and reports."""
