"""One file per schema revision, oldest first: 0001 initial schema, 0002 model_versions.artifact_version."""
