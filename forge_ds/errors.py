"""The one exception type for user mistakes.

Raised anywhere a user's input is wrong (config, paths, data, resume target). The CLI catches it and prints
`forge-ds: error: <message>` and exits 2; every other exception is a bug and keeps its traceback.
Write messages as one line: what was wrong, where, what to do.
"""


class ForgeError(Exception):
    """A user-facing error: bad input, not a bug."""
