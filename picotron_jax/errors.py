"""The one exception type for mistakes a user can fix (bad config, missing data, impossible mesh).

The CLI catches it, prints its message on stderr without a traceback and exits with code 2.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and how to fix it."""


class RunAborted(Exception):
    """The run gave up on its own (a non-finite loss, a detector's `stop`): the CLI prints the message in
    one line and exits with code 4. Checkpoints already written are intact."""

    exit_code = 4
