"""The project's two exception types: ForgeError for user mistakes, TrainingDiverged for a run that diverged.

Raised anywhere a user's input is wrong (config, paths, data, resume target). The CLI catches it and prints
`forge-ds: error: <message>` and exits 2; every other exception is a bug and keeps its traceback.
Write messages as one line: what was wrong, where, what to do.
"""


USER_ERROR_PREFIX = "forge-ds: error: "  # how the CLI starts each error line; the benchmarks look for it


def describe(exc: BaseException, limit: int = 200) -> str:
    """The one way an exception we did not raise is quoted inside our one-line errors: its type and the first
    `limit` characters of its message, whitespace (an OS message's newlines too) folded to single spaces."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


class ForgeError(Exception):
    """A user-facing error: bad input, not a bug."""


class Interrupted(Exception):
    """Ctrl-C ended a phase that cannot finish its work later by itself; the message says what to run instead.
    The CLI prints it as one line and exits 130 (128 + SIGINT)."""


class TrainingDiverged(RuntimeError):
    """Loss or gradient went non-finite; the last good checkpoint is kept. Here, not in train.py, so that the CLI
    catches it without importing the training stack (data, tokenizers, DeepSpeed) for commands that never train."""
