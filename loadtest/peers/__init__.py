"""Serving peers for ``make bench``: the same graphs served the way other frameworks' users would serve them.

``bentoml_idiomatic``: BentoML's documented adaptive batching (REST). ``kserve_model``: a ``kserve.Model``
on ``kserve.ModelServer`` (Open Inference Protocol, REST and gRPC), run from its own virtual environment
(``kserve_venv``). ``launch`` starts either as a child process on 127.0.0.1 for the benchmark.
"""
