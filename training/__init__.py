"""Datasets split by time, models fitted through the library adapters (``boosters``),
calibration, Optuna tuning, MLflow tracking, the registry's champion gate, and the
side-by-side comparison of versions.

``labels`` and ``datasets`` build train | validation | holdout by snapshot time;
``pipeline`` is one run (fit, calibrate, measure, log, register); ``registry`` promotes,
gates and rolls back aliases; ``compare`` measures versions on one holdout; ``tuning``
runs a resumable study. Imports ``configs``, ``features``, ``boosters`` and the serving
side's model loader and scoring core; nothing imports it but the front door.
"""
