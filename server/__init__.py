"""The online phase: a gRPC server that loads one bundle and streams top-k hits for image, pixel, id or vector
queries, with re-ranking, exact metadata filters, health checking, reflection and graceful shutdown.

Modules, one reason to change each: ``config`` (settings), ``search_engine`` (exact search over a bundle),
``planning`` (request -> query plan), ``batching`` (micro-batched description), ``servicer`` (the RPCs),
``admission`` (concurrency bound, counters, request log), ``status`` (exception -> gRPC status), ``security``
(TLS, tokens) and ``startup`` (bind, load, signals; :func:`~cbmir.server.startup.start_server`).
"""
