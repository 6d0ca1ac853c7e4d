"""The base every config section derives from: unknown keys are errors, assignments re-validate."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict


class Section(BaseModel):
    """A typed config section. Field docstrings (``use_attribute_docstrings``) feed ``--help``."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        frozen=False,
        allow_inf_nan=False,  # no setting means anything as NaN or infinity; None is the way to say "off"
    )


_TRUE_WORDS, _FALSE_WORDS = ("on", "yes", "true"), ("off", "no", "false")


def choice(*words: str) -> Any:
    """A Literal of ``words`` that also takes YAML's booleans as the word the user typed.

    YAML 1.1 reads an unquoted ``off``/``no`` as false and ``on``/``yes`` as true, in config files
    and in ``--set`` alike; an option whose values include such a word gets it back here.
    """
    true = next((w for w in _TRUE_WORDS if w in words), None)
    false = next((w for w in _FALSE_WORDS if w in words), None)

    def words_from_bool(v: Any) -> Any:
        if v is True and true is not None:
            return true
        if v is False and false is not None:
            return false
        return v

    return Annotated[Literal[words], BeforeValidator(words_from_bool)]
