"""The one exception type that means "the user can fix this": the CLI turns it into exit code 2."""


class UserError(Exception):
    """A problem in the user's input (recipe, data, flags, files). The message says what and where."""
