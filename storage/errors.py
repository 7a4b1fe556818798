"""Errors raised by the storage package.

StorageError
 ├── DatabaseUnavailable   the database cannot be reached (at start-up or later)
 ├── SchemaOutOfDate       the database schema is behind the code: run `dallebot db upgrade`
 ├── NotFound              no request / user with that id
 ├── IllegalTransition     the state machine forbids the change (e.g. approve a posted request)
 └── LeaseLost             a worker's claim is no longer valid: another worker owns the request now
"""


class StorageError(Exception):
    """Base class; the message is one line meant for a person."""


class DatabaseUnavailable(StorageError):
    pass


class SchemaOutOfDate(StorageError):
    pass


class NotFound(StorageError):
    pass


class IllegalTransition(StorageError):
    def __init__(self, request_id: int, current: str, target: str, action: str | None = None,
                 detail: str | None = None) -> None:
        self.request_id = request_id
        self.current = current
        self.target = target
        what = f"cannot {action} request {request_id}" if action else f"request {request_id} cannot go"
        super().__init__(f"{what}: it is {current}, " + (detail or f"and {current} -> {target} is not allowed"))


class LeaseLost(StorageError):
    """A worker's update found the request no longer under its lease."""

    @classmethod
    def for_request(cls, request_id: int, status: str) -> "LeaseLost":
        return cls(f"request {request_id} is no longer {status} under this worker's lease "
                   "(reclaimed by another worker, cancelled, or finished): result dropped")
