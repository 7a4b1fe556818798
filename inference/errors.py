"""Errors raised by the inference package.

InferenceError
 ├── BundleError        a model bundle is missing, corrupt or does not match its manifest
 ├── CheckpointError    a published checkpoint cannot be converted (names the parameter and file)
 └── PromptError        a prompt cannot be generated from (e.g. empty after normalisation)
"""


class InferenceError(Exception):
    """Base class: the message is meant for a user, one line, saying what to do next."""


class BundleError(InferenceError):
    pass


class CheckpointError(InferenceError):
    pass


class PromptError(InferenceError):
    pass
