"""Errors a user can cause. The CLI prints their message (one sentence) and exits non-zero;
anything else is a bug and shows a traceback only with --debug."""


class UserError(Exception):
    """Base class: bad input, missing or corrupt files, impossible configurations."""


class ConfigError(UserError):
    """An impossible or unknown configuration value."""


class ModelError(UserError):
    """Unknown model, wrong hook, or a model that cannot do what was asked."""


class DataError(UserError):
    """Missing, corrupt or incompatible files: activations, checkpoints, DuckDB builds."""


class TrainingError(UserError):
    """Training had to stop (NaN/inf), with the last good checkpoint kept."""
