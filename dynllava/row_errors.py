"""A row that failed, and whether trying it again can help. Offline jobs write the kind beside the message (the
output's `error_kind` column), and `dynllava caption --retry-errors` redoes the transient ones by default.

- input: the row itself breaks a rule (an unreadable, missing or oversized image, an empty prompt, a prompt over
  the context, a sparsity the server does not allow). It fails the same way however often it is tried.
- transient: anything else (an image URI that could not be read, out of memory, a full queue, an engine failure):
  a later attempt may succeed.
"""

from __future__ import annotations

from dataclasses import dataclass

INPUT = "input"
TRANSIENT = "transient"
KINDS = (INPUT, TRANSIENT)
RETRY_CHOICES = (TRANSIENT, "all")  # what `--retry-errors` redoes: the transient error rows (its default), or all


@dataclass(frozen=True)
class RowError:
    """One row's failure, in place of its output."""

    message: str  # one line: what went wrong, shown in the output's `error` column
    kind: str  # INPUT or TRANSIENT (the output's `error_kind` column)

    @classmethod
    def from_exception(cls, e: BaseException) -> "RowError":
        """The exception's message, classified by `kind_of`."""
        return cls(str(e), kind_of(e))


def kind_of(e: BaseException) -> str:
    """INPUT for a ValueError (every rule a row can break is checked with one) or a missing file; TRANSIENT for
    anything else, e.g. an OSError from an object store, out of memory, a full queue."""
    return INPUT if isinstance(e, (ValueError, FileNotFoundError)) else TRANSIENT
