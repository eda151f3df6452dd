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


class InferenceOnlyBackbone(AdapterError):
    """Training asked of a backbone quantised for inference only (quantize='int8-dynamic', core/int8dynamic.py)."""

    def __init__(self, scheme: str = "int8-dynamic"):
        self.scheme = scheme
        super().__init__(f"quantize={scheme!r} is for inference only: its matmuls run on int8 activations, which "
                         "pass no gradient. Train the adapter over quantize='int8' (QLoRA-style) or the float "
                         f"backbone, save it, then serve the file over ak.load(name, quantize={scheme!r}): "
                         "it loads on either")

    def __reduce__(self) -> tuple:
        return type(self), (self.scheme,)
