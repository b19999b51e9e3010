"""emq-green's client: send jobs to an eMQP/1.0 router and, from emq-green's
router, get their results back; ``emq-green-submit`` is its command line.

Exposes :class:`Client`, :func:`defer_job` (``delay=``/``eta=`` for a
delayed job), :func:`job`, :func:`schedule` and :func:`unschedule` (periodic
jobs), :class:`GuaranteedBatch` (guaranteed jobs confirmed as a batch), and
the result handle and errors; wire-compatible with EventMQ
0.3.13's client.
"""

from .api import (
    DEFAULT_ADDR,
    ENV_BROKER_ADDR,
    Client,
    callable_path,
    defer_job,
    get_client,
    job,
    schedule,
    send_request,
    unschedule,
)
from .batch import GuaranteedBatch
from .connect import RouterUnreachable
from .results import (
    ConfirmTimeout,
    GuaranteeRefused,
    JobError,
    ResultHandle,
    ResultLostError,
    ResultTimeout,
    SendTimeoutError,
)

__all__ = ["Client", "SendTimeoutError", "ResultHandle", "JobError", "ResultTimeout",
           "ResultLostError", "ConfirmTimeout", "GuaranteeRefused", "defer_job",
           "send_request", "job", "get_client", "callable_path", "ENV_BROKER_ADDR",
           "DEFAULT_ADDR", "schedule", "unschedule", "RouterUnreachable", "GuaranteedBatch"]
