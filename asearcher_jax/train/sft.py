"""`asearcher sft`: supervised fine-tuning on trajectory files, the loss on the agent's own
tokens only (the record's loss mask), each sequence of a record trained in the context it was
sampled in. Warm-starts RL from expert trajectories; works the same on real checkpoints."""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asearcher_jax.agent.trajectory import read_jsonl
from asearcher_jax.errors import DataError
from asearcher_jax.train.lm import PackedBatch, make_sft_step
from asearcher_jax.train.optimizer import make_optimizer
from asearcher_jax.train.packing import pack_sequences


def sft_rows(paths: list[str], row_tokens: int, loss_on: str = "agent"
             ) -> tuple[dict[str, np.ndarray], int]:
  """Every sequence of every record in `paths`, packed into rows; (rows, records read).

  `loss_on="all"` trains on every token, prompts and tool output included: for a policy that
  was never pretrained (the debug model), the world's text it reads is language-model data,
  and copying names between titles, URLs and passages teaches it the copying that search
  needs; a pretrained model keeps the default, its own tokens only."""
  seqs, n = [], 0
  for path in paths:
    for t in read_jsonl(path):
      n += 1
      for s in t.sequences():
        tokens, mask = t.tokens[s][:row_tokens], t.loss_mask[s][:row_tokens]
        if loss_on == "all":
          mask = np.ones_like(mask)
        if mask[1:].any():
          seqs.append({"tokens": tokens, "loss_mask": mask})
  if not seqs:
    raise DataError(f"no trainable tokens in {paths}: records need token ids and a loss mask "
                    "(text-only records from an OpenAI endpoint cannot be trained on)")
  rows, _ = pack_sequences(seqs, row_tokens)
  return rows, n


def run_sft(model, paths: list[str], *, optimizer_cfg, row_tokens: int, batch_rows: int,
            epochs: int, loss_on: str = "agent", seed: int = 0, progress: bool = True,
            echo: Callable[[str], None] = print) -> list[float]:
  """Trains `model` in place; returns the loss of every step."""
  from tqdm.auto import tqdm
  rows, records = sft_rows(paths, row_tokens, loss_on)
  r = len(rows["tokens"])
  batch_rows = min(batch_rows, r)
  steps_per_epoch = -(-r // batch_rows)
  echo(f"sft: {records} records, {r} rows of {row_tokens} tokens, "
       f"{int(rows['loss_mask'].sum())} loss tokens, {steps_per_epoch} steps per epoch")
  params, opt_state, step = make_sft_step(model, make_optimizer(optimizer_cfg))
  rng = np.random.default_rng(seed)
  losses = []
  with tqdm(total=epochs * steps_per_epoch, desc="sft", unit="step", disable=not progress) as bar:
    for _ in range(epochs):
      order = rng.permutation(r)
      order = np.concatenate([order, order[:(-r) % batch_rows]])  # whole batches: one shape
      for i in range(steps_per_epoch):
        idx = order[i * batch_rows:(i + 1) * batch_rows]
        batch = PackedBatch(**{k: jnp.asarray(rows[k][idx]) for k in
                               ("tokens", "positions", "segment_ids", "loss_mask")})
        params, opt_state, metrics = step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
  nnx.update(model, params)
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  return losses


def sft_command(cfg, paths: list[str], out: str, *, epochs: int, batch_rows: int,
                loss_on: str = "agent", progress: bool = True) -> str:
  """Loads the config's policy, fine-tunes it, writes an HF directory to `out`."""
  from asearcher_jax.models import build_tokenizer, create_model, from_pretrained, save_pretrained
  from asearcher_jax.sharding import make_mesh
  m = cfg.model
  mesh = make_mesh(cfg.mesh.shape())
  if m.path:
    model, tokenizer, _ = from_pretrained(m.path, mesh, dtype=m.dtype, param_dtype=m.param_dtype,
                                          attention_impl=m.attention, remat=m.remat,
                                          progress=progress)
  else:
    model = create_model(m.arch, mesh, seed=m.seed, param_dtype=m.param_dtype, dtype=m.dtype,
                         attention_impl=m.attention, remat=m.remat)
    tokenizer = build_tokenizer()
  losses = run_sft(model, paths, optimizer_cfg=cfg.optimizer, row_tokens=cfg.rl.row_tokens,
                   batch_rows=batch_rows, epochs=epochs, loss_on=loss_on, seed=m.seed,
                   progress=progress)
  path = save_pretrained(model, os.path.abspath(out), tokenizer=tokenizer, overwrite=True,
                         progress=False)
  print(f"sft: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; wrote {path}")
  return path
