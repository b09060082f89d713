"""What both worker roles share: the engine thread, the gRPC control service, the load report.

The roles themselves (``pdserve.prefill``, ``pdserve.decode``) are thin: a role object plugs into
:class:`~pdserve.worker.servicer.WorkerServicer` and sets per-request flags on the shared engine.
"""
