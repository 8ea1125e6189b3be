"""`asearcher world build` and `asearcher world solve`: the synthetic world and its expert.

  asearcher world build --out DIR [--seed S] [--max-hops N] [--index]
  asearcher world solve --config FILE --out TRAJ.jsonl [--world DIR] [--split train]
                        [--limit N [--rest QA.jsonl]]
"""

from __future__ import annotations

_WORLD_FLAGS = ("seed", "min_hops", "max_hops", "questions_per_hop", "num_people", "num_cities",
                "num_countries", "num_orgs", "num_works", "max_facts_per_passage")


def cmd_world_build(args) -> int:
  from pydantic import ValidationError

  from asearcher_jax.errors import ConfigError
  from asearcher_jax.outdir import WORLD_MARKERS, check_out_dir
  from asearcher_jax.world import generate_world, write_world
  from asearcher_jax.world.config import load_world_config, preset
  from asearcher_jax.world.io import world_index
  flags = {k: getattr(args, k) for k in _WORLD_FLAGS}
  try:
    if args.config:
      cfg = load_world_config(args.config, **flags)
    else:
      cfg = preset(args.preset, **flags)
  except ValidationError as e:
    raise ConfigError(f"world build: {e}") from None
  check_out_dir(args.out, overwrite=args.overwrite, markers=WORLD_MARKERS, what="world")
  world = generate_world(cfg)
  write_world(world, args.out, overwrite=args.overwrite)
  print(f"world {args.out}: {len(world.entities)} entities, {len(world.passages)} passages, "
        f"{len(world.pages)} pages, {len(world.qa_train)} train / {len(world.qa_test)} test "
        f"questions ({cfg.min_hops}-{cfg.max_hops} hops)")
  if args.index:  # the world was just written whole, so it has no index yet
    print(f"index {world_index(args.out)}")
  return 0


def cmd_world_solve(args) -> int:
  from asearcher_jax.config import load_config
  from asearcher_jax.expert.trajectories import solve_command
  from asearcher_jax.world import ensure_world
  if args.concurrency < 1 or (args.limit is not None and args.limit < 1):
    from asearcher_jax.errors import ConfigError
    raise ConfigError("world solve: --concurrency and --limit must be at least 1")
  cfg = load_config(args.config, args.overrides)
  solve_command(cfg, world_dir=args.world or ensure_world(cfg.world), split=args.split,
                out=args.out,
                limit=args.limit, keep=args.keep, concurrency=args.concurrency, seed=args.seed,
                progress=not args.no_progress, rest=args.rest)
  return 0


def register(subparsers) -> None:
  """Add `world build` and `world solve` to the `asearcher` subcommands."""
  from asearcher_jax.world.config import WorldConfig
  d = WorldConfig()

  world = subparsers.add_parser("world", help="the synthetic knowledge world")
  wsub = world.add_subparsers(dest="world_cmd", required=True)
  w = wsub.add_parser("build", help="generate corpus.jsonl, pages.jsonl and QA files")
  w.add_argument("--out", required=True)
  w.add_argument("--preset", default="debug", help="a named world: debug (default) or "
                                                   "long_horizon")
  w.add_argument("--config", help="YAML file of WorldConfig fields (instead of a preset); "
                                  "flags below override it")
  for name in _WORLD_FLAGS:
    w.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                   help=f"default {getattr(d, name)}")
  w.add_argument("--index", action="store_true", help="also build OUT/index")
  w.add_argument("--overwrite", action="store_true")
  w.set_defaults(fn=cmd_world_build)

  v = wsub.add_parser("solve", help="the expert solver over a split, through the agent and a "
                                    "retrieval server: trajectories for `asearcher sft`")
  v.add_argument("--config", help="YAML config (agent, search, reward; the tokenizer of "
                                  "model.path)")
  v.add_argument("overrides", nargs="*", metavar="key=value")
  v.add_argument("--world", help="world directory (default: the config's `world:` world, "
                                 "the debug one unless set, built on first use)")
  v.add_argument("--split", default="train", choices=["train", "test"])
  v.add_argument("--out", required=True, help="trajectory JSONL to write")
  v.add_argument("--limit", type=int, help="a seeded random sample of N questions of the split "
                                           "(the files are sorted by hops)")
  v.add_argument("--seed", type=int, default=0, help="of the sample")
  v.add_argument("--rest", metavar="QA.jsonl", help="also write the split's questions left out "
                                                    "of --limit's sample (RL data unseen in SFT)")
  v.add_argument("--keep", choices=["solved", "all"], default="solved",
                 help="write only full-reward trajectories (default) or all")
  v.add_argument("--concurrency", type=int, default=16)
  v.add_argument("--no-progress", action="store_true")
  v.set_defaults(fn=cmd_world_solve)

