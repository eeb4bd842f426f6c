"""Experiments over whole runs: the staleness sweep behind `asyncrl sweep`, its tables and plots.

Owns launching `asyncrl run` once per grid point (sweep), reducing the runs' metrics.jsonl and
queue logs to tables (summary) and drawing them (plots). Must never train, generate or open a
socket of the pipeline itself: every run is a separate `asyncrl run` process, as a user would start
it, so that what a sweep measures is what a user gets.
"""
