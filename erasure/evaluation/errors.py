"""The evaluation's errors: each message is one line and says what to do."""


class EvaluationError(ValueError):
    """Bad input to an evaluation (the message is one line and says what to do)."""


class ClipLoadError(EvaluationError):
    """A CLIP model could not be loaded (unknown name or tag, bad folder)."""
