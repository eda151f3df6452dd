"""Decoding engines below the tasks: `continuous` runs rows that join and leave one batch between steps.

The tasks (Translator, Generator) and the service's scheduler both drive it; it knows nothing of
prompts, languages or requests, only token ids, adapters and stop rules.
"""
