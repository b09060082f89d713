"""The gRPC edge of pdserve, shared by servers (router, workers) and the client SDK.

* :mod:`pdserve.rpc.convert` is the one place that converts between ``pdserve.v1`` proto messages and
  pdserve's dataclasses (:class:`~pdserve.common.sampling_params.SamplingParams`,
  :class:`~pdserve.common.outputs.RequestDelta`, the result types of :mod:`pdserve.rpc.types`).
* :mod:`pdserve.rpc.status` maps exceptions to gRPC status codes and aborts servicer calls with them.
* :mod:`pdserve.rpc.server` starts a ``grpc.aio`` server with the standard health service.
* :mod:`pdserve.rpc.options` holds the channel and server options both sides agree on.

Torch-free: this package imports only grpc, protobuf, the standard library, ``pdserve.common`` and
``pdserve.v1``. Import the submodules directly; this ``__init__`` imports nothing.
"""
