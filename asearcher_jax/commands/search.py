"""`asearcher index build` and `asearcher retrieval serve`: the search tools' subcommands.

  asearcher index build --corpus X [--pages Y] --out DIR [--dense-encoder HF_DIR]
  asearcher retrieval serve [--config FILE [key=value ...]] [--index DIR] [--host H] [--port P]
                            [--token T]

`retrieval serve` without `--index` serves the default debug world, generating it and its
index into the cache directory on first use. Run them as `asearcher ...` (`asearcher_jax.cli`).
"""

from __future__ import annotations

import os
import sys


def cmd_index_build(args) -> int:
  from asearcher_jax.tools.dense import EncoderConfig
  from asearcher_jax.tools.index import build_index
  enc = EncoderConfig(pooling=args.pooling, query_prefix=args.query_prefix,
                      passage_prefix=args.passage_prefix, max_length=args.max_length,
                      batch_size=args.batch_size)
  m = build_index(args.corpus, args.out, pages=args.pages, dense_encoder=args.dense_encoder,
                  encoder_config=enc, overwrite=args.overwrite)
  print(f"index {args.out}: {m['num_docs']} passages, {m['num_pages']} pages, "
        f"{'+'.join(m['retrievers'])}, built in {m['build_seconds']}s")
  return 0


_SERVE_FLAGS = ("index", "host", "port", "workers", "mode")


def serve_section(args):
  """The server's RetrievalSection: the `retrieval` section of `--config FILE [overrides]`
  (defaults without one), with any flag given on the command line on top. Invalid values
  (`--workers 0`) are a ConfigError, printed as one line, not a pydantic traceback."""
  from pydantic import ValidationError

  from asearcher_jax.errors import ConfigError
  from asearcher_jax.tools.config import RetrievalSection
  if args.config or args.overrides:
    from asearcher_jax.config import load_config
    base = load_config(args.config, args.overrides).retrieval.model_dump()
  else:
    base = RetrievalSection().model_dump()
  flags = {k: getattr(args, k) for k in _SERVE_FLAGS if getattr(args, k) is not None}
  if args.topk is not None:
    flags["default_topk"] = args.topk
  try:
    return RetrievalSection(**{**base, **flags})
  except ValidationError as e:
    bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    raise ConfigError(f"retrieval serve: {bad}") from None


def cmd_retrieval_serve(args) -> int:
  if not args.accelerator and "jax" not in sys.modules:
    # bm25s initialises JAX at import; a server process must not claim the accelerator.
    os.environ["JAX_PLATFORMS"] = "cpu"
  from asearcher_jax.tools.retrieval_server import run_server
  from asearcher_jax.world.io import default_world_index
  cfg = serve_section(args)
  token = args.token or os.environ.get(cfg.token_env) or None  # "" means none
  world = None
  if cfg.index is None and (args.config or args.overrides):  # the config's world
    from asearcher_jax.config import load_config
    world = load_config(args.config, args.overrides).world
  run_server(cfg.index or default_world_index(world), cfg.host, cfg.port, token, cfg,
             dense_encoder=args.dense_encoder)
  return 0


def register(subparsers) -> None:
  """Add `index` and `retrieval` to the `asearcher` subcommands."""

  index = subparsers.add_parser("index", help="search indexes")
  isub = index.add_subparsers(dest="index_cmd", required=True)
  b = isub.add_parser("build", help="build a BM25 (and optionally dense) index from JSONL")
  b.add_argument("--corpus", required=True, help="JSONL rows: id, title, contents, url")
  b.add_argument("--pages", help="JSONL rows: url, title, contents, links (for /access)")
  b.add_argument("--out", required=True, help="index directory to write")
  b.add_argument("--dense-encoder", help="local HF directory of an E5/BGE-style BERT encoder")
  b.add_argument("--pooling", choices=["mean", "cls"], default="mean",
                 help="mean (E5) or cls (BGE)")
  b.add_argument("--query-prefix", default="query: ")
  b.add_argument("--passage-prefix", default="passage: ")
  b.add_argument("--max-length", type=int, default=256)
  b.add_argument("--batch-size", type=int, default=64)
  b.add_argument("--overwrite", action="store_true")
  b.set_defaults(fn=cmd_index_build)

  retrieval = subparsers.add_parser("retrieval", help="the retrieval server")
  rsub = retrieval.add_subparsers(dest="retrieval_cmd", required=True)
  s = rsub.add_parser("serve", help="serve /retrieve, /access, /health over an index")
  s.add_argument("--config", help="YAML config whose `retrieval` section applies; flags "
                                  "given here override it")
  s.add_argument("overrides", nargs="*", metavar="key=value",
                 help="dotted config overrides, e.g. retrieval.max_topk=50")
  s.add_argument("--index", help="index directory (default: retrieval.index, else the debug "
                                 "world's, built on first use)")
  s.add_argument("--host", help="default 127.0.0.1")
  s.add_argument("--port", type=int, help="default 8010")
  s.add_argument("--token", help="bearer token (required off loopback; default "
                                 "$ASEARCHER_RETRIEVAL_TOKEN)")
  s.add_argument("--workers", type=int, help="search threads (default 4)")
  s.add_argument("--mode", choices=["bm25", "dense", "hybrid"], help="default bm25")
  s.add_argument("--topk", type=int, help="topk when a request gives none (default 5)")
  s.add_argument("--dense-encoder", help="encoder directory, if not where the index "
                                         "manifest says (dense/hybrid indexes)")
  s.add_argument("--accelerator", action="store_true",
                 help="let JAX use the accelerator (dense encoder); default: CPU only")
  s.set_defaults(fn=cmd_retrieval_serve)
