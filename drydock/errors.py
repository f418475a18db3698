class DrydockError(RuntimeError):
    """A failure to report to the operator: the message is one line, fit to show as is."""
