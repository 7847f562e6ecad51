"""The gRPC front end: ``inference.GRPCInferenceService`` on the HTTP server's event loop."""
