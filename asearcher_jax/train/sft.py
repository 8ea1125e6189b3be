"""`asearcher sft`: supervised fine-tuning on trajectory files, the loss on the agent's own
tokens only (the record's loss mask), each sequence of a record trained in the context it was
sampled in. Warm-starts RL from expert trajectories; works the same on real checkpoints."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asearcher_jax.agent.trajectory import read_jsonl
from asearcher_jax.errors import ConfigError, DataError
from asearcher_jax.outdir import HF_MARKERS, check_out_dir
from asearcher_jax.train.lm import (
  PackedBatch,
  loss_positions,
  make_sft_step,
  next_token_predictions,
)
from asearcher_jax.train.optimizer import make_optimizer
from asearcher_jax.train.packing import pack_sequences

if TYPE_CHECKING:  # annotations only: config.py assembles every section, above this module
  from asearcher_jax.config import Config


log = logging.getLogger(__name__)


def sft_rows(paths: list[str], row_tokens: int, loss_on: str = "agent"
             ) -> tuple[dict[str, np.ndarray], int]:
  """Every sequence of every record in `paths`, packed into rows; (rows, records read).

  `loss_on="all"` also trains on prompts and tool output, as language-model data. Even the
  never-pretrained debug policy does better without it: trained to predict the world's facts
  where they first appear, it learns to recall them, and then writes a remembered year or name
  over the one the search result shows (debug seeds 4 / 0, 120 held-out questions: EM Avg@4
  22.3 / 32.3, against 52.3 / 54.0 on its own tokens with the same steps)."""
  seqs, n = [], 0
  cut, lost, total = 0, 0, 0  # sequences longer than a row; their loss tokens past it
  for path in paths:
    if not os.path.isfile(path):
      raise DataError(f"{path}: no such trajectory file")
    for t in read_jsonl(path):
      n += 1
      for s in t.sequences():
        tokens, mask = t.tokens[s], t.loss_mask[s]
        if loss_on == "all":
          mask = np.ones_like(mask)
        total += int(mask.sum())
        if len(tokens) > row_tokens:
          cut, lost = cut + 1, lost + int(mask[row_tokens:].sum())
          tokens, mask = tokens[:row_tokens], mask[:row_tokens]
        if mask[1:].any():
          seqs.append({"tokens": tokens, "loss_mask": mask})
  if cut:
    log.warning("sft: %d sequences are longer than a row of %d tokens (rl.row_tokens): their "
                "last %d of all %d loss tokens are not trained (a final answer among them); "
                "raise rl.row_tokens or lower agent.max_context_tokens", cut, row_tokens,
                lost, total)
  if not seqs:
    raise DataError(f"no trainable tokens in {paths}: records need token ids and a loss mask "
                    "(text-only records from an OpenAI endpoint cannot be trained on)")
  rows, _ = pack_sequences(seqs, row_tokens)
  return rows, n


def _batches(rows: dict[str, np.ndarray], idx: np.ndarray) -> PackedBatch:
  return PackedBatch(**{k: jnp.asarray(rows[k][idx]) for k in
                        ("tokens", "positions", "segment_ids", "loss_mask", "select")
                        if k in rows})


def count_turns(weight: np.ndarray, hit: np.ndarray) -> tuple[int, int]:
  """(turns, turns every token of which is a greedy hit) in [R, T] arrays, a turn being a run
  of weighted targets (tool output and segment starts have weight 0 and separate them)."""
  turns = reproduced = 0
  for w, h in zip(weight, hit):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], w.astype(np.int8), [0]])))
    for a, b in zip(edges[::2], edges[1::2]):
      turns += 1
      reproduced += bool(h[a:b].all())
  return turns, reproduced


def make_evaluator(model, rows: dict[str, np.ndarray], batch_rows: int):
  """evaluate(params) -> held-out metrics of the agent's tokens in `rows`: mean NLL, greedy
  token accuracy, and the share of agent turns that greedy decoding reproduces whole under
  teacher forcing (seconds, where a rollout evaluation takes minutes: a quick check of what
  SFT has taught before the RL stage)."""
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  score = jax.jit(lambda p, b: next_token_predictions(nnx.merge(graphdef, p, rest), b))
  r = len(rows["tokens"])
  pad = {k: np.concatenate([v, np.zeros((-r % batch_rows,) + v.shape[1:], v.dtype)])
         for k, v in rows.items()}  # zero rows are padding (segment 0): one compiled shape

  def evaluate(params) -> dict[str, float]:
    nll = hits = tokens = turns = reproduced = 0.0
    for start in range(0, r, batch_rows):
      logp, hit, weight = (np.asarray(x) for x in score(
          params, _batches(pad, np.arange(start, start + batch_rows))))
      nll -= float((logp * weight).sum())
      hits += float((hit * weight).sum())
      tokens += float(weight.sum())
      n, k = count_turns(weight > 0, hit)
      turns, reproduced = turns + n, reproduced + k
    return {"loss": nll / max(tokens, 1), "token_accuracy": hits / max(tokens, 1),
            "turns_reproduced": reproduced / max(turns, 1), "turns": int(turns)}

  return evaluate


def run_sft(model, paths: list[str], *, optimizer_cfg, row_tokens: int, batch_rows: int,
            epochs: int, loss_on: str = "agent", eval_paths: list[str] = (),
            eval_every: int = 0, seed: int = 0, progress: bool = True,
            echo: Callable[[str], None] = print) -> tuple[list[float], list[dict]]:
  """Trains `model` in place; returns the loss of every step and the held-out evaluations
  (`eval_paths`: before training, every `eval_every` steps or each epoch, and at the end)."""
  from tqdm.auto import tqdm
  if eval_every < 0:
    raise ConfigError(f"eval_every={eval_every}: a number of steps, or 0 for each epoch")
  if epochs < 1 or batch_rows < 1:
    raise ConfigError(f"epochs={epochs}, batch_rows={batch_rows}: both must be at least 1")
  rows, records = sft_rows(paths, row_tokens, loss_on)
  r = len(rows["tokens"])
  batch_rows = min(batch_rows, r)
  steps_per_epoch = -(-r // batch_rows)
  rows["select"] = loss_positions(rows["segment_ids"], rows["loss_mask"])
  echo(f"sft: {records} records, {r} rows of {row_tokens} tokens, "
       f"{int(rows['loss_mask'].sum())} loss tokens (the LM head runs on "
       f"{rows['select'].shape[1]} positions a row), {steps_per_epoch} steps per epoch")
  total = epochs * steps_per_epoch
  params, opt_state, step = make_sft_step(model, make_optimizer(optimizer_cfg, total))
  evaluations = []
  evaluate = None
  if eval_paths:
    held_out, n = sft_rows(list(eval_paths), row_tokens, "agent")
    evaluate = make_evaluator(model, held_out, batch_rows)
    echo(f"sft: evaluating on the agent tokens of {n} held-out records")
  every = eval_every or steps_per_epoch

  def run_eval(k: int):
    result = {"step": k, **evaluate(params)}
    evaluations.append(result)
    (tqdm.write if progress else echo)(
        f"sft: step {k}: held-out loss {result['loss']:.4f}, token accuracy "
        f"{result['token_accuracy']:.1%}, turns reproduced {result['turns_reproduced']:.1%} "
        f"of {result['turns']}")

  rng = np.random.default_rng(seed)
  losses = []
  with tqdm(total=total, desc="sft", unit="step", disable=not progress) as bar:
    if evaluate:
      run_eval(0)
    for _ in range(epochs):
      order = rng.permutation(r)
      order = np.concatenate([order, order[:(-r) % batch_rows]])  # whole batches: one shape
      for i in range(steps_per_epoch):
        params, opt_state, metrics = step(
            params, opt_state, _batches(rows, order[i * batch_rows:(i + 1) * batch_rows]))
        losses.append(float(metrics["loss"]))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if evaluate and (len(losses) % every == 0 or len(losses) == total):
          run_eval(len(losses))
  nnx.update(model, params)
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  return losses, evaluations


def sft_command(cfg: Config, paths: list[str], out: str, *, epochs: int, batch_rows: int,
                loss_on: str = "agent", eval_paths: list[str] = (), eval_every: int = 0,
                progress: bool = True, overwrite: bool = False) -> str:
  """Loads the config's policy, fine-tunes it, writes an HF directory to `out` (refused before
  any training if `out` is a file, or a non-empty directory and not `overwrite`)."""
  from asearcher_jax.models.pretrained import load_policy, save_pretrained
  from asearcher_jax.sharding import make_mesh
  check_out_dir(out, overwrite=overwrite, markers=HF_MARKERS, what="HF checkpoint")
  m = cfg.model
  model, tokenizer, _ = load_policy(m, make_mesh(cfg.mesh.shape()), progress=progress)
  losses, _ = run_sft(model, paths, optimizer_cfg=cfg.optimizer, row_tokens=cfg.rl.row_tokens,
                      batch_rows=batch_rows, epochs=epochs, loss_on=loss_on,
                      eval_paths=eval_paths, eval_every=eval_every, seed=m.seed,
                      progress=progress)
  path = save_pretrained(model, os.path.abspath(out), tokenizer=tokenizer, overwrite=True,
                         progress=False)
  print(f"sft: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; wrote {path}")
  return path
