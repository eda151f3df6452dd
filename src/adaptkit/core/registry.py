"""Method name → adapter family. Families register themselves; the bank and the file reader look them up.

The registry lives in the core so that the bank never imports a family: `adaptkit.methods`
fills it when the package is imported (which `import adaptkit` always does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaptkit.core.errors import AdapterError

if TYPE_CHECKING:
    from adaptkit.methods.base import Adapter

METHODS: dict[str, type[Adapter]] = {}


def register_method(adapter_class: type[Adapter]) -> type[Adapter]:
    """Class decorator: make a family known to the bank and to the file reader by its method name."""
    name = adapter_class.method
    if not name or name in METHODS:
        raise ValueError(f"method name {name!r} is empty or already registered")
    METHODS[name] = adapter_class
    return adapter_class


def adapter_class_for(method: str) -> type[Adapter]:
    try:
        return METHODS[method]
    except KeyError:
        raise AdapterError(
            f"unknown adapter method {method!r}; known methods: {sorted(METHODS)}. "
            "A file from a newer adaptkit may need an upgrade"
        ) from None
