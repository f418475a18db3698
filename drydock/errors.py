class DrydockError(RuntimeError):
    """A failure to report to the operator: the message is one line, fit to show as is."""


class Interrupted(DrydockError):
    """A step stopped by Ctrl-C: reported like any failure, but never taken for a failed
    check (the pipeline rolls its target back only for a check that really failed)."""
