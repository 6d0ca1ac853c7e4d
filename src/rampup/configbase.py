"""The base every config section derives from: unknown keys are errors, assignments re-validate."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A typed config section. Field docstrings (``use_attribute_docstrings``) feed ``--help``."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        frozen=False,
        allow_inf_nan=False,  # no setting means anything as NaN or infinity; None is the way to say "off"
    )
