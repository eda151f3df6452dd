"""The core: errors, backbone loading, role maps, per-call routing, the adapter file and store, the bank.

Nothing here imports a family, a task, the trainer or the CLI; families register into
`registry` and the bank finds them there.
"""

from adaptkit.core import quiet as _quiet  # noqa: F401  (before any module here imports transformers)
