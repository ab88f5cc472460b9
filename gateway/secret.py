"""The Secret type: a value that never prints itself."""

from __future__ import annotations

from typing import Final, Generic, TypeVar

T = TypeVar("T", str, bytes)

MASK: Final = "***"


class Secret(Generic[T]):
    """Wraps key material, passwords and DSNs; `reveal()` is the one place plaintext leaves."""

    __slots__ = ("_value",)
    _value: T

    def __init__(self, value: T) -> None:
        self._value = value

    def reveal(self) -> T:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK})"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")
