"""The version of lfm2np (also in pyproject.toml; a test keeps them equal)."""

__version__ = "0.2.0.dev0"
