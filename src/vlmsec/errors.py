"""One error type for every bad input a user can hand us; the CLI turns it into exit code 2."""


class VlmsecError(Exception):
    """A user-facing error: the message names the file, entry or field at fault."""

    exit_code = 2
