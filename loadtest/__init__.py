"""Load testing, the benchmark and the soak test of the medrefine service.

    python -m loadtest bench [--duration-s 15] [--out loadtest/results/NAME.json]
    python -m loadtest soak --minutes 10 --out loadtest/results/soak.json
    python -m loadtest http|grpc --url ... --mode closed|open ...   (one load step, JSON summary)
    locust -f loadtest/locustfile.py --host http://127.0.0.1:3000 ...

Modules: ``stats`` (records, percentiles, summaries), ``driver`` (closed/open-loop scheduling over any
async ``send``), ``http_load`` / ``grpc_load`` (senders for REST, OIP-HTTP and OIP-gRPC), ``workload``
(request images), ``prom`` (/metrics histograms), ``system`` (server processes, CPU/RSS sampling,
machine description), ``profile`` (py-spy summaries), ``naive_server`` (the research-code baseline),
``bench``, ``soak`` and ``locustfile`` (Locust users for REST and OIP-HTTP).
Everything talks to loopback only.
"""
