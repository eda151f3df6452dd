"""Decoding engines below the tasks: `continuous` runs rows that join and leave one batch between steps,
over a slot KV cache (`slots`), with per-row decoder positions for encoder–decoders (`seq2seq`) and the
generation config's forced and banned tokens (`rules`).

The tasks (Translator, Generator) and the service's scheduler both drive it; it knows nothing of
prompts, languages or requests, only token ids, adapters and stop rules.
"""
