"""Dense encoder parity with `transformers` (tiny random BERT) and exact search."""

import json
import os

import numpy as np
import pytest

from asearcher_jax.errors import RetrievalError
from asearcher_jax.tools.dense import (
  DenseEncoder,
  EncoderConfig,
  build_embeddings,
  exact_search,
  load_hf_bert,
  pool,
)

WORDS = ["the", "of", "mayor", "city", "born", "capital", "country", "who", "where", "what",
         "year", "founded", "kestrel", "harbor", "river", "alen", "varro", "works", "institute",
         "query", "passage", ":", "organisation", "employer"]


def write_tokenizer(path):
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
                                       + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
                                       + list("abcdefghijklmnopqrstuvwxyz0123456789"))}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.decoder = decoders.WordPiece()
  tok.save(os.path.join(path, "tokenizer.json"))
  return tok, len(vocab)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  import torch
  from transformers import BertConfig, BertModel
  path = str(tmp_path_factory.mktemp("bert"))
  tok, vocab_size = write_tokenizer(path)
  torch.manual_seed(0)
  cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
  model = BertModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.save_pretrained(path)
  return path, model, tok


def _hf_hidden(model, tok, texts):
  import torch
  encs = tok.encode_batch(texts)
  L = max(len(e.ids) for e in encs)
  ids = np.zeros((len(texts), L), np.int64)
  mask = np.zeros((len(texts), L), np.int64)
  for i, e in enumerate(encs):
    ids[i, :len(e.ids)] = e.ids
    mask[i, :len(e.ids)] = 1
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  return ids, mask, out.last_hidden_state.numpy()


def test_hidden_states_match_transformers(bert_dir):
  path, model, tok = bert_dir
  texts = ["who was the mayor of kestrel", "alen varro",
           "the capital of the country where the harbor works institute was founded"]
  ids, mask, ref = _hf_hidden(model, tok, texts)
  ours = np.asarray(load_hf_bert(path)(ids.astype(np.int32), mask.astype(bool)))
  m = mask.astype(bool)
  np.testing.assert_allclose(ours[m], ref[m], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_embeddings_match_transformers(bert_dir, pooling):
  path, model, tok = bert_dir
  texts = ["where was alen varro born", "kestrel harbor", "year founded"]
  cfg = EncoderConfig(pooling=pooling, query_prefix="query: ", batch_size=2)
  enc = DenseEncoder(path, cfg)
  ours = enc.encode(texts, is_query=True)
  _, mask, hidden = _hf_hidden(model, tok, ["query: " + t for t in texts])
  if pooling == "cls":
    ref = hidden[:, 0]
  else:
    ref = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
  # Padding to a bucket does not change the vector of a short text.
  np.testing.assert_allclose(enc.encode(texts[1:2], is_query=True), ours[1:2], atol=1e-5)


def test_build_embeddings_and_exact_search(bert_dir, tmp_path):
  path, _, _ = bert_dir
  enc = DenseEncoder(path, EncoderConfig(batch_size=3))
  texts = [f"{w} {v}" for w in WORDS[:6] for v in WORDS[6:11]]
  vecs = build_embeddings(enc, texts, str(tmp_path / "embeddings.npy"))
  assert np.load(tmp_path / "embeddings.npy", mmap_mode="r").shape == (len(texts), 32)
  q = enc.encode(texts[:4], is_query=False)
  idx, scores = exact_search(vecs, q, k=5, chunk=7)  # chunks smaller than k exercise merging
  brute = q @ np.asarray(vecs).T
  np.testing.assert_array_equal(idx[:, 0], np.arange(4))
  np.testing.assert_allclose(scores, -np.sort(-brute, axis=1)[:, :5], atol=1e-6)


def test_missing_weights_named(tmp_path):
  with pytest.raises(RetrievalError, match="config.json"):
    load_hf_bert(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({
      "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
      "intermediate_size": 8}))
  with pytest.raises(RetrievalError, match="safetensors"):
    load_hf_bert(str(tmp_path))


def test_pool_ignores_padding():
  import jax.numpy as jnp
  h = jnp.asarray(np.arange(12, dtype=np.float32).reshape(1, 3, 4))
  out = pool(h, jnp.asarray([[True, True, False]]), "mean", normalize=False)
  np.testing.assert_allclose(np.asarray(out), [[2, 3, 4, 5]])


def test_dense_and_hybrid_index_through_cli_and_server(bert_dir, tmp_path):
  import argparse
  import urllib.error
  import urllib.request

  from asearcher_jax.commands.search import register
  from asearcher_jax.tools.index import SearchIndex
  from asearcher_jax.tools.retrieval_server import ServerThread, create_app
  path, _, _ = bert_dir
  rows = [{"id": f"d{i}", "title": f"T{i}", "contents": f"{a} {b} {c}", "url": f"u{i}"}
          for i, (a, b, c) in enumerate(zip(WORDS, WORDS[3:] + WORDS[:3], WORDS[7:] + WORDS[:7]))]
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("\n".join(json.dumps(r) for r in rows))
  p = argparse.ArgumentParser()
  register(p.add_subparsers(dest="cmd"))
  out = str(tmp_path / "idx")
  args = p.parse_args(["index", "build", "--corpus", str(corpus), "--out", out,
                       "--dense-encoder", path, "--pooling", "cls", "--query-prefix", "",
                       "--passage-prefix", "", "--batch-size", "4"])
  assert args.fn(args) == 0
  index = SearchIndex(out)
  assert index.modes == ["bm25", "dense", "hybrid"]
  assert index.dense.encoder.config.pooling == "cls"
  # Passages are embedded as BM25 indexes them, title included (passage_text): the query
  # of exactly that text is the passage's own vector.
  from asearcher_jax.tools.index import passage_text
  [res] = index.search([passage_text(rows[5])], 3, mode="dense")
  assert res[0][0] == 5 and abs(res[0][1] - 1.0) < 1e-5
  [hyb] = index.search([rows[5]["contents"]], 4, mode="hybrid", alpha=0.5)
  assert hyb[0][0] == 5 and [s for _, s in hyb] == sorted((s for _, s in hyb), reverse=True)
  with ServerThread(create_app(index)) as srv:
    for mode in ("dense", "hybrid", "bm25"):
      req = urllib.request.Request(srv.url + "/retrieve", method="POST", data=json.dumps(
          {"queries": [passage_text(rows[2])], "topk": 2, "mode": mode}).encode())
      with urllib.request.urlopen(req) as r:
        hits = json.loads(r.read())["result"][0]
      assert hits[0]["id"] == "d2", mode
    req = urllib.request.Request(srv.url + "/access", method="POST",
                                 data=json.dumps({"urls": ["u1"]}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(req)
    assert e.value.code == 404 and "no pages" in json.loads(e.value.read())["error"]
  os.remove(os.path.join(out, "dense", "embeddings.npy"))
  with pytest.raises(RetrievalError, match="embeddings.npy: file not found"):
    SearchIndex(out)


def test_query_batches_padded_to_few_shapes(bert_dir):
  """Every batch size used to be its own XLA compile; rows are padded to a power of two."""
  path, _, _ = bert_dir
  enc = DenseEncoder(path, EncoderConfig(batch_size=8))
  single = enc.encode(["harbor river"], is_query=True)
  before = enc._forward._cache_size()
  for n in (3, 5, 6, 7):
    out = enc.encode(["harbor river"] * n, is_query=True)
    np.testing.assert_allclose(out, np.repeat(single, n, 0), atol=1e-5)
  assert enc._forward._cache_size() - before == 2  # batch shapes 4 and 8
