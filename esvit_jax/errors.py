"""User mistakes, told apart from bugs: the command-line tools print their message and exit with 2."""


class UserError(ValueError):
  """A bad config value, an unknown name, an unusable input: the message says what to change."""


class NotFoundError(UserError, FileNotFoundError):
  """A dataset, checkpoint or file that the user named does not exist or is not prepared."""
