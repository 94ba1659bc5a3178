"""The few ways a medclf job ends on purpose, and their exit statuses."""

EXIT_BAD_INPUT = 2
# A job stopped by SIGTERM/SIGUSR1 after saving a checkpoint; 75 is EX_TEMPFAIL ("try again"),
# which the Slurm templates turn into a requeue.
EXIT_PREEMPTED = 75

# Training diverged: a loss or gradient became NaN/inf. Not bad input (2) and not worth a plain
# retry (75): the same settings would diverge again at the same step.
EXIT_DIVERGED = 3


class MedclfError(Exception):
    """Bad input or configuration: printed as one line naming the file, row or key; exit status 2."""


class Preempted(Exception):
    """Raised after a stop signal has been honoured and a checkpoint saved."""


class Diverged(Exception):
    """A non-finite loss or gradient, caught before the optimizer step: one line, exit status 3."""
