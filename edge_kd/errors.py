"""User-facing errors: one line, exit status 2, never a traceback."""


class UserError(Exception):
    """A mistake in the user's input (a file, a name, a value); its message is one line for the user."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def first_line(e: BaseException) -> str:
    """Returns the first line of exception ``e``'s message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
