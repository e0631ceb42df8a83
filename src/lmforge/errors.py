"""The one exception type users see.

Library code raises `LMForgeError` for anything the *user* got wrong (a missing file, a bad
config key, a corrupt checkpoint). The CLI catches it once and prints a single line with exit
code 2. Bugs in lmforge itself stay ordinary exceptions with tracebacks.
"""


class LMForgeError(Exception):
    """A problem with the user's input, with a message that says what to do about it."""
