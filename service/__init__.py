"""Serving: the servers around ``inference`` (BentoML app, REST, OIP over HTTP and gRPC, middleware,
batcher, settings, metrics, errors). ``service.runtime.ServiceRuntime`` is what every front end calls.
"""
