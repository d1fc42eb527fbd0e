"""The one error the model layer raises for bad input: a model that cannot be built, loaded or explained."""

from __future__ import annotations


class ModelError(ValueError):
    """The model cannot be built or loaded; the message names the file and the fix."""
