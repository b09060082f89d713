"""Generated protobuf/gRPC stubs of ``proto/pdserve/v1`` (do not edit; regenerate with ``make proto``)."""
