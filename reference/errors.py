"""The one error type for bad input: the CLI turns it into exit code 2 and a message on stderr."""


class InputError(ValueError):
    """Bad input from the user: a file, row, column or argument. The message names which."""
