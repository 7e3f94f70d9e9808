"""Prefect flows, one per DVC stage. Thin: each composes tasks that call `tspo_core` and publishes artifacts.

Run a stage by hand with `python -m flows.<stage> [--params params.yaml]`; `dvc repro` runs them in order.
"""
