"""attrs validators for options classes (published in ``kdtoolkit.api``).

Any field validator's error (these, attrs' own ``in_``/``instance_of``, or a plain ``ValueError``)
is reported at its key as one line: ``models.student.depth: must be > 0, got 0``. Checks across keys
(in ``__attrs_post_init__``) raise ``FieldError(key, message)`` to name the key they blame.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


class FieldError(ValueError):
    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def check(predicate: Callable[[Any], bool], message: str):
    """Validator from a predicate; ``message`` may use ``{value}``. ``None`` values pass."""

    def validator(inst, attribute, value):
        if value is not None and not predicate(value):
            raise FieldError(attribute.name, message.format(value=value))

    return validator


positive = check(lambda v: v > 0, "must be > 0, got {value!r}")
non_negative = check(lambda v: v >= 0, "must be >= 0, got {value!r}")


def in_range(low, high):
    return check(lambda v: low <= v <= high, f"must be between {low} and {high}, got {{value!r}}")


def one_of(values: Iterable[Any]):
    values = tuple(values)
    return check(lambda v: v in values, f"must be one of {', '.join(map(repr, values))}, got {{value!r}}")
