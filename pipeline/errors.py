"""The project's user-facing errors: the message names the thing and what to do, and a job prints it in one
line (`jobs.common.run_job`). Anything else is a bug and keeps its traceback.

`UserError` is a `ValueError`, so code (and users' code) that catches `ValueError` keeps working; storage
errors are `storage.StorageError`, an `OSError`, and count as user errors too.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad config, input, or environment, explained in one line."""


def user_error_names() -> set[str]:
    """Class names of `UserError` and every subclass defined so far (to find them in a Ray traceback's text)."""
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names
