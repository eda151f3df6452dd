"""The one exception type users catch: anything wrong with an adapter, its file or its use."""


class AdapterError(ValueError):
    """Raised for anything wrong with an adapter, its file or its use; the message names the fix."""


class SourceTooLong(AdapterError):
    """A source over the token limit of a prompt, where the caller cannot split it: refused whole, never cut."""

    def __init__(self, tokens: int, limit: int, fix: str = "send it in shorter pieces (Translator.translate splits "
                                                           "a long text at sentence ends itself), or raise "
                                                           "max_source_len"):
        self.tokens = tokens
        self.limit = limit
        self.fix = fix
        super().__init__(f"the source is {tokens} tokens long, over the limit of {limit} tokens per source; {fix}")

    def __reduce__(self) -> tuple:
        # Pickled across worker processes: rebuilt from its fields, not from the message alone.
        return type(self), (self.tokens, self.limit, self.fix)
