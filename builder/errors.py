"""The one error a build reports to the user: a sentence that says what is wrong, no traceback."""


class BuildError(Exception):
    pass
