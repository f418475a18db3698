class DrydockError(RuntimeError):
    """A failure to report to the operator: the message is one line, fit to show as is."""


class HostUnreachable(DrydockError):
    """A playbook stopped because a host stopped answering (its SSH connection failed): its
    plays' rescue blocks, which say what the failure left, did not run for that host."""


class Interrupted(DrydockError):
    """A step stopped by Ctrl-C: reported like any failure, but never taken for a failed
    check (the pipeline rolls its target back only for a check that really failed)."""
