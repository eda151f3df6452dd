"""The one exception type users catch: anything wrong with an adapter, its file or its use."""


class AdapterError(ValueError):
    """Raised for anything wrong with an adapter, its file or its use; the message names the fix."""
