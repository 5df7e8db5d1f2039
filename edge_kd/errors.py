"""User-facing errors: one line, exit status 2, never a traceback."""


class UserError(Exception):
    """A mistake in the user's input (a file, a name, a value); its message is one line for the user."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
