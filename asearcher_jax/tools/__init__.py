"""The agent's tools: a retrieval server (BM25 / dense / hybrid) with the Search-R1/ASearcher
JSON API, web search and browse adapters, a disk cache, and the agent-facing client.

Import submodules directly (`asearcher_jax.tools.client`, ...); this package import stays
light so that the agent side does not pull in bm25s or JAX.
"""
