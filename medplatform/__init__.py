"""The platform below the HTTP layer: metadata database, blob store and model registry (issue #17).

Framework-free: the service, ``python -m medplatform`` and the tests call these modules; see docs/platform.md.
"""
