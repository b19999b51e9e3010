"""The job manager's parts: job slots, the link to the router, the socket
under it, and the default extensions (subprocess pool, loop-block monitor,
heartbeat thread, offload, metrics and the worker's page).

Nothing here is public API: :class:`emq_green.jobmanager.JobManager` is the
face, and :mod:`emq_green.extensions` the contract extensions are written
against. Import-free on purpose, like the top package: a subprocess child
(``python -m emq_green.worker.child``) loads only what it runs.
"""
