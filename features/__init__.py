"""Event log -> point-in-time user-behaviour matrices.

``events`` loads and validates the contract's log (DuckDB views over Parquet/CSV, in UTC
and local time); ``attribution`` defines "opened" once; ``families`` declares every
user-level feature family (what it computes, from which events, its columns' names,
meanings and wording); ``matrix`` joins them with the per-slot families, pooled with
population priors computed over a stated population; ``rows`` turns a matrix into model
rows; ``snapshot`` writes and reads a matrix with its manifest; ``importer`` maps a
user's own table onto the log. Imports ``configs`` only.
"""
