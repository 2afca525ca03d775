"""The version of skdeep (read by ``pyproject.toml`` and ``skdeep.__version__``)."""

__version__ = "0.2.0"
