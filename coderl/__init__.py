"""Shared plumbing for the coderl scripts: task I/O, models, generation, rewards, logs, checkpoints.

Algorithm math lives in the top-level ``train_*.py`` scripts; this package holds only plumbing.
"""

__version__ = "0.1.0"
