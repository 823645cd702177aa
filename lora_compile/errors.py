"""The one exception type the tool raises for bad input.

Its message is a single line that says what is wrong and what to do; the CLI
prints it as ``error: <message>`` and exits non-zero.
"""


class LoraCompileError(Exception):
    """Bad input or an unsupported request, explained in one line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised as a KeyboardInterrupt so every cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
