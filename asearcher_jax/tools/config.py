"""Config sections of the search tools (attached to the main config as `retrieval`, `web` and
`search`); frozen, and unknown keys are errors so a typo in YAML never passes silently."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asearcher_jax.section import Section


class RetrievalSection(Section):
  """The local retrieval server (`asearcher retrieval serve`)."""


  index: str | None = None  # index directory; None: the debug world's, built on first use
  host: str = "127.0.0.1"
  port: int = Field(8010, ge=0, le=65535)
  token_env: str = "ASEARCHER_RETRIEVAL_TOKEN"  # required when host is not loopback
  default_topk: int = Field(5, ge=1)
  max_topk: int = Field(100, ge=1)
  max_queries: int = Field(512, ge=1)  # searched at once; a larger batch goes in chunks
  max_hits: int = Field(65536, ge=1)  # queries x topk per /retrieve request: the reply's size
  max_query_chars: int = Field(4096, ge=1)
  max_urls: int = Field(64, ge=1)  # per /access request
  max_body_bytes: int = Field(4 << 20, ge=1024)
  request_timeout_s: float = Field(30.0, gt=0)
  workers: int = Field(4, ge=1)  # threads running searches; requests beyond queue up
  mode: Literal["bm25", "dense", "hybrid"] = "bm25"
  hybrid_alpha: float = Field(0.5, ge=0.0, le=1.0)


class WebSection(Section):
  """Web search and browsing adapters (Serper-style search, Jina-style reader, plain fetch)."""


  search_url: str = "https://google.serper.dev"
  reader_url: str = "https://r.jina.ai"
  search_key_env: str = "SERPER_API_KEY"
  reader_key_env: str = "JINA_API_KEY"
  reader: Literal["jina", "fetch"] = "jina"
  timeout_s: float = Field(30.0, gt=0)
  max_retries: int = Field(3, ge=0)
  backoff_s: float = Field(0.5, ge=0)
  max_backoff_s: float = Field(8.0, ge=0)
  concurrency: int = Field(10, ge=1)
  cache_path: str | None = None  # sqlite file; None: no cache
  cache_ttl_s: float | None = None  # None: entries never expire
  max_page_chars: int = Field(250_000, ge=1)
  # Plain fetch opens the URLs the policy writes: unless this is set, it refuses any that
  # resolve to a loopback, private, link-local or otherwise non-public address (a policy could
  # otherwise read cloud metadata, the replay queue or other internal services).
  fetch_private: bool = False


class SearchClientSection(Section):
  """What the agent talks to, and how pages are cut for reading one chunk per turn."""


  backend: Literal["local", "web"] = "local"
  url: str = "http://127.0.0.1:8010"  # the retrieval server (local backend)
  token_env: str = "ASEARCHER_RETRIEVAL_TOKEN"
  topk: int = Field(5, ge=1)
  timeout_s: float = Field(30.0, gt=0)
  chunk_chars: int = Field(10_000, ge=100)
  max_chunks: int = Field(10, ge=1)
