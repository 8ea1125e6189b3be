"""QA loaders (every format, bad rows, the real published eval files) and the TF-free TFDS store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from asearcher_jax.data import DataError, QAItem, detect_format, load_qa

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "data")
REPO = os.path.dirname(HERE)
EVAL = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "eval"))


def fx(name: str) -> str:
  return os.path.join(FIX, name)


def write_verl_parquet(path: str) -> str:
  """A DeepResearcher-style (verl) parquet with the quirks of the real files."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  def row(source, content, truth, index, **info):
    return {"data_source": source, "prompt": [{"content": content, "role": "user"}],
            "ability": "search & question answering",
            "reward_model": {"ground_truth": truth, "style": "unknown"},
            "extra_info": {"index": index, "split": "dev", **info}}

  rows = [
      row("nq", "where did the battle of bonhomme richard take place", "near Flamborough Head",
          "nq_-608"),
      row("tq", '"What is a ""white dwarf""?"', "star<|answer_split|>white dwarf star\n",
          "tq_1"),
      row("hotpotqa", "Answer the given question. Think first.\nQuestion: Who wrote Dune?\n",
          "Frank Herbert", "hp_2"),
      row("nq", "a question without a usable answer", "<|answer_split|> ", "nq_3"),
      row("2wiki", "", "Paris", "2w_4"),
  ]
  info_type = pa.struct([("index", pa.string()), ("split", pa.string())])
  schema = pa.schema([
      ("data_source", pa.string()),
      ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
      ("ability", pa.string()),
      ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
      ("extra_info", info_type),
  ])
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
  return path


# ------------------------------------------------------------------------------- formats

def test_asearcher_format_list_and_string_answers_and_extras():
  r = load_qa(fx("asearcher.jsonl"))
  assert r.format == "asearcher" and not r.skipped and len(r) == 3
  a, b, c = r.items
  assert a == QAItem("as-0001", "Who founded the company that makes the Kindle?", ("Jeff Bezos",),
                     ("Bezos", "Jeffrey Preston Bezos"), "asearcher-base", {})
  assert a.all_answers == ("Jeff Bezos", "Bezos", "Jeffrey Preston Bezos")
  # String answer, no qid: a stable hash of (source, question).
  assert b.answers == ("Stockholm",) and b.aug_answers == ()
  assert b.qid.startswith("asearcher-base-")
  assert b.qid == load_qa(fx("asearcher.jsonl")).items[1].qid  # stable
  # Our synthetic world's rows: no source field -> the file name; world fields land in extra.
  assert c.source == "asearcher" and c.qid == "train-000003"
  assert c.extra["hops"] == 2 and c.extra["supporting_facts"] == ["p7", "p9"]
  assert c.extra["chain"][0]["relation"] == "born_in"


def test_flashrag_format():
  r = load_qa(fx("flashrag.jsonl"), source="nq")
  assert r.format == "flashrag" and not r.skipped
  assert r.items[0].qid == "test_0" and r.items[0].source == "nq"
  assert r.items[0].answers == ("Wilhelm Conrad Röntgen", "Wilhelm Röntgen")
  assert r.items[0].extra == {"metadata": {"dataset": "nq"}}
  assert r.items[1].extra == {}


def test_r1_searcher_format_namespaces_integer_ids():
  r = load_qa(fx("r1_searcher.jsonl"))
  assert r.format == "r1-searcher" and not r.skipped
  assert [i.qid for i in r.items] == ["r1_searcher_1", "r1_searcher_2"]
  assert r.items[1].answers == ("Titan IIIE",)
  assert r.items[1].extra == {}  # gen_text_store is a model output, not data
  assert load_qa(fx("r1_searcher.jsonl"), source="bamboogle").items[0].qid == "bamboogle_1"


def test_deepresearcher_parquet(tmp_path):
  path = write_verl_parquet(str(tmp_path / "dev.parquet"))
  r = load_qa(path)
  assert r.format == "deepresearcher"
  assert [(s.line, s.reason) for s in r.skipped] == [(4, "missing or empty answer"),
                                                     (5, "missing or empty question")]
  nq, tq, hp = r.items
  assert nq.qid == "nq_-608" and nq.source == "nq" and nq.answers == ("near Flamborough Head",)
  assert nq.extra == {"ability": "search & question answering", "extra_info": {"split": "dev"},
                      "reward_model": {"style": "unknown"}}
  assert tq.question == 'What is a "white dwarf"?'  # CSV quoting undone
  assert tq.answers == ("star", "white dwarf star")  # split on <|answer_split|>, stripped
  assert hp.question == "Who wrote Dune?"  # templated prompt cut after "Question:"
  assert load_qa(path, format="deepresearcher", limit=2).items == [nq, tq]


def test_auto_detection_and_explicit_format():
  assert detect_format({"id": 1, "question": "q", "golden_answers": ["a"]}) == "flashrag"
  assert detect_format({"idx": 1, "question": "q", "answer": "a"}) == "r1-searcher"
  assert detect_format({"question": "q", "answer": ["a"]}) == "asearcher"
  assert detect_format({"prompt": [], "reward_model": {}}) == "deepresearcher"
  assert detect_format({"text": "x"}) is None
  # Forcing a format: r1-searcher rows read as asearcher keep idx/gen_text_store in extra.
  r = load_qa(fx("r1_searcher.jsonl"), format="asearcher")
  assert r.format == "asearcher" and r.items[0].extra == {"idx": 1, "gen_text_store": ""}
  assert load_qa(fx("r1_searcher.jsonl"), format="R1_Searcher").format == "r1-searcher"


def test_bad_rows_reported_with_line_numbers_and_skipped():
  r = load_qa(fx("bad_rows.jsonl"))
  assert [i.question for i in r.items] == ["Which planet is known as the Red Planet?",
                                           "Which element has the symbol Fe?"]
  lines = {s.line: s.reason for s in r.skipped}
  assert sorted(lines) == [2, 4, 5, 6, 7, 8]  # line 3 is blank: not a row
  assert "question" in lines[2] and "question" in lines[4]
  assert "answer" in lines[5] and "answer" in lines[6]
  assert lines[7].startswith("invalid JSON") and "object" in lines[8]
  assert all(s.path == fx("bad_rows.jsonl") for s in r.skipped)
  text = r.summary()
  assert "2 items, 6 skipped" in text and "line 7: invalid JSON" in text
  assert load_qa(fx("bad_rows.jsonl"), limit=1).items == r.items[:1]


def test_missing_file_unknown_format_and_undetectable(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    load_qa(tmp_path / "nope.jsonl")
  with pytest.raises(DataError, match="unknown QA format"):
    load_qa(fx("asearcher.jsonl"), format="csv")
  odd = tmp_path / "odd.jsonl"
  odd.write_text('{"text": "a passage"}\n')
  with pytest.raises(DataError, match="cannot tell the QA format"):
    load_qa(odd)
  broken = tmp_path / "broken.jsonl"
  broken.write_text("{not json\n")
  with pytest.raises(DataError, match="no JSON object"):
    load_qa(broken)
  fake = tmp_path / "fake.parquet"
  fake.write_text("not parquet")
  with pytest.raises(DataError, match="cannot read as parquet"):
    load_qa(fake)
  assert issubclass(DataError, ValueError)


def test_odd_field_types_are_skipped_not_raised(tmp_path):
  p = tmp_path / "odd.jsonl"
  rows = [{"prompt": "Question: ok?", "reward_model": {"ground_truth": "yes"}},
          {"prompt": [{"role": "user", "content": "q?"}], "reward_model": {"ground_truth": "a"},
           "extra_info": "not a dict"},
          {"prompt": [{"role": "user", "content": {"nested": 1}}],
           "reward_model": {"ground_truth": "a"}}]
  p.write_text("".join(json.dumps(r) + "\n" for r in rows))
  r = load_qa(p)
  assert r.format == "deepresearcher" and [i.question for i in r.items] == ["ok?"]
  assert [s.line for s in r.skipped] == [2, 3]


def test_repeated_questions_kept_with_unique_qids(tmp_path):
  p = tmp_path / "rep.jsonl"
  rows = [{"question": "Same?", "answer": "a"}, {"question": "Same?", "answer": "b"},
          {"qid": "x", "question": "Q1", "answer": "c"},
          {"qid": "x", "question": "Q2", "answer": "d"}]
  p.write_text("".join(json.dumps(r) + "\n" for r in rows))
  r = load_qa(p)
  assert len(r) == 4 and r.repeated_questions == 1 and r.duplicate_ids == 1
  assert r.items[1].qid == r.items[0].qid + "#2"
  assert [it.qid for it in r.items[2:]] == ["x", "x#2"]  # each question keeps its own key
  assert "1 duplicate ids" in r.summary() and "1 repeated questions" in r.summary()


def test_answer_forms_of_real_datasets(tmp_path):
  """verl's {"target": "Paris"} was split into letters (so "P" scored right); StrategyQA's
  true/false were refused or spelt "False"; a year read from a column with gaps is 1990.0."""
  p = tmp_path / "forms.jsonl"
  rows = [{"question": "a?", "answer": {"target": "Paris"}},
          {"question": "b?", "answer": {"target": 1990}},
          {"question": "c?", "answer": True}, {"question": "d?", "answer": [False, "nope"]},
          {"question": "e?", "answer": 1990.0}, {"question": "f?", "answer": 2.5}]
  p.write_text("".join(json.dumps(r) + "\n" for r in rows))
  r = load_qa(p)
  assert [i.answers for i in r.items] == [("Paris",), ("1990",), ("yes",), ("no", "nope"),
                                          ("1990",), ("2.5",)]


def test_a_lone_surrogate_or_a_byte_order_mark(tmp_path):
  """A lone surrogate ("\\ud83d", valid JSON, cut from an emoji) crashed the whole load, and
  a dataset built from it failed naming no row; a BOM cost the first row."""
  p = tmp_path / "odd.jsonl"
  p.write_bytes(b'\xef\xbb\xbf{"question": "q1?", "answer": "a"}\n'
                b'{"question": "bad \\ud83d?", "answer": "a"}\n'
                b'{"qid": "x", "question": "q3?", "answer": "a\\udc00"}\n'
                b'{"question": "q4?", "answer": "b"}\n')
  r = load_qa(p)
  assert [i.question for i in r.items] == ["q1?", "q4?"]
  assert [s.line for s in r.skipped] == [2, 3] and "surrogate" in r.skipped[0].reason


def test_auto_detection_looks_past_a_bad_first_row(tmp_path):
  p = tmp_path / "first_bad.jsonl"
  p.write_text('{"question": "no answer here?"}\n{"question": "q?", "answer": "a"}\n')
  r = load_qa(p)
  assert r.format == "asearcher" and [i.question for i in r.items] == ["q?"]
  assert [(s.line, s.reason) for s in r.skipped] == [(1, "missing or empty answer")]


def test_a_renamed_duplicate_never_takes_another_rows_id(tmp_path):
  p = tmp_path / "ids.jsonl"
  rows = [{"qid": "x", "question": "Q1", "answer": "a"}, {"qid": "x", "question": "Q2",
                                                          "answer": "b"},
          {"qid": "x#2", "question": "Q3", "answer": "c"}]
  p.write_text("".join(json.dumps(r) + "\n" for r in rows))
  qids = [i.qid for i in load_qa(p).items]
  assert len(set(qids)) == 3 and qids[:2] == ["x", "x#2"]


def test_csv_unquoting_only_touches_fully_wrapped_questions():
  from asearcher_jax.data.qa import _unquote_csv

  assert _unquote_csv('"Who was ""Sportsman of the Year""?"') == 'Who was "Sportsman of the Year"?'
  assert _unquote_csv('"Hello"') == "Hello"
  kept = '"Twenty Two" is an episode of "The Twilight Zone"'
  assert _unquote_csv(kept) == kept


def test_datasets_that_share_a_file_name_are_named_by_their_folder(tmp_path):
  """FlashRAG ships nq/test.jsonl and triviaqa/test.jsonl with the same ids ("test_0"): two
  datasets of two questions each, not one "test" whose questions shadow each other."""
  from asearcher_jax.data import load_datasets
  paths = []
  for ds in ("nq", "triviaqa"):
    (tmp_path / ds).mkdir()
    paths.append(str(tmp_path / ds / "test.jsonl"))
    with open(paths[-1], "w") as f:
      for i in range(2):
        f.write(json.dumps({"id": f"test_{i}", "question": f"{ds} {i}?",
                            "golden_answers": ["x"]}) + "\n")
  items, _, _ = load_datasets(paths)
  assert [(ds, it.qid) for ds, it in items] == [
      ("nq", "test_0"), ("nq", "test_1"), ("triviaqa", "test_0"), ("triviaqa", "test_1")]
  items, _, _ = load_datasets(paths[:1])  # alone, a file is named as it always was
  assert {ds for ds, _ in items} == {"test"}
  with pytest.raises(DataError, match="named twice"):  # the same file twice
    load_datasets([paths[0], paths[0]])


def test_item_json_roundtrip():
  item = load_qa(fx("asearcher.jsonl")).items[2]
  assert QAItem.from_json(item.to_json()) == item
  assert QAItem.from_json(json.loads(item.to_json())) == item
  assert QAItem("q", "Q?", ["a"]).answers == ("a",)  # lists are frozen into tuples
  assert hash(item) == hash(QAItem.from_json(item.to_json()))  # `extra` is not hashed


# ----------------------------------------------------------------------- real published files

REAL = {  # path -> (rows, first question, first answers)
    "deepresearcher/test.parquet": (
        3197, ("What is the date of birth of Millicent Leveson-Gower, Duchess Of Sutherland's "
               "husband?"), ("20 July 1851",)),
    "deepresearcher/dev.parquet": (
        875, ("Lasting from 1299 to 1922, the Ottoman empire roughly corresponds to what modern "
              "day country?"), None),
    "r1-searcher/hotpotqa_500.jsonl": (
        500, ("In the 1973 NFL season, the Pro Bowl took place at what football stadium that is "
              "part of the Truman Sports Complex, along with what other stadium?"),
        ("Kauffman Stadium",)),
    "r1-searcher/2wiki_500.jsonl": (
        500, "Who is Ahmose-Henutemipet's paternal grandmother?", ("Tetisheri",)),
    "r1-searcher/musique_500.jsonl": (
        500, "What was the director of Addicted to Love nominated for?",
        ("Academy Award for Best Live Action Short Film",)),
    "r1-searcher/bamboogle.jsonl": (
        125, "Who was president of the United States in the year that Citibank was founded?",
        ("james madison",)),
}


@pytest.mark.skipif(not os.path.isdir(EVAL), reason="shared/data/eval not present")
@pytest.mark.parametrize("rel", sorted(REAL))
def test_real_eval_files_load_without_skips(rel):
  rows, question, answers = REAL[rel]
  r = load_qa(os.path.join(EVAL, rel))
  assert r.skipped == [], r.summary()
  assert len(r) == rows and r.duplicate_ids == 0
  assert len({i.qid for i in r.items}) == rows
  assert r.items[0].question == question
  if answers is not None:
    assert r.items[0].answers == answers
  else:  # TriviaQA: many aliases
    assert "turkey" in r.items[0].answers and len(r.items[0].answers) > 20
  assert all(i.question and i.answers and all(a.strip() == a and a for a in i.answers)
             for i in r.items)


# ---------------------------------------------------------------------------------- TFDS

READER = textwrap.dedent("""
    import json, sys
    from asearcher_jax.data import QADataSource
    out = {}
    for split in ("train", "test"):
      src = QADataSource(sys.argv[1], split)
      out[split] = [it.to_dict() for it in src]
    out["shards"] = [[QADataSource(sys.argv[1], "train", i, 3).global_index(j)
                      for j in range(len(QADataSource(sys.argv[1], "train", i, 3)))]
                     for i in range(3)]
    out["tf"] = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  from asearcher_jax.data import build_qa_dataset

  tmp = tmp_path_factory.mktemp("tfds")
  parquet = write_verl_parquet(str(tmp / "dev.parquet"))
  sources = {"train": [fx("asearcher.jsonl"), fx("bad_rows.jsonl"), fx("r1_searcher.jsonl")],
             "test": [parquet, fx("flashrag.jsonl")]}
  path = build_qa_dataset(sources, str(tmp / "out"), name="qa_test", progress=False)
  expected = {s: [it for f in fs for it in load_qa(f).items] for s, fs in sources.items()}
  return path, expected, sources, tmp


def test_tfds_build_and_read_back_in_order(built):
  from asearcher_jax.data import QADataSource

  path, expected, sources, tmp = built
  assert path == str(tmp / "out" / "qa_test" / "1.0.0")
  for split, items in expected.items():
    src = QADataSource(path, split)
    assert len(src) == len(items) == sum(len(load_qa(f)) for f in sources[split])
    assert list(src) == items
    assert src[-1] == items[-1] and src.__getitems__([2, 0]) == [items[2], items[0]]
  # The parent directory resolves to its newest version; the build provenance is kept.
  src = QADataSource(str(tmp / "out" / "qa_test"), "train")
  bad = src.metadata["splits"]["train"][1]
  assert bad["skipped"] == 6 and bad["items"] == 2 and bad["skipped_rows"][0][0] == 2
  with pytest.raises(DataError, match="dataset_info.json"):
    QADataSource(str(tmp), "train")
  with pytest.raises(DataError, match="no split"):
    QADataSource(path, "validation")
  with pytest.raises(ValueError):
    QADataSource(path, "train", shard_index=3, num_shards=3)


def test_tfds_sharding_disjoint_complete_and_balanced(built):
  from asearcher_jax.data import QADataSource

  path, expected, _, _ = built
  n = len(expected["train"])
  shards = [QADataSource(path, "train", i, 3) for i in range(3)]
  idx = [[s.global_index(j) for j in range(len(s))] for s in shards]
  assert sorted(k for ix in idx for k in ix) == list(range(n))
  assert max(map(len, idx)) - min(map(len, idx)) <= 1
  for s, ix in zip(shards, idx):
    assert list(s) == [expected["train"][k] for k in ix]


def test_tfds_rebuild_requires_overwrite(built):
  from asearcher_jax.data import build_qa_dataset

  _, _, _, tmp = built
  with pytest.raises(DataError, match="already exists"):
    build_qa_dataset([fx("flashrag.jsonl")], str(tmp / "out"), name="qa_test", progress=False)
  with pytest.raises(DataError, match="no usable rows"):
    empty = tmp / "empty.jsonl"
    empty.write_text('{"question": "q", "answer": []}\n')
    build_qa_dataset({"train": [str(empty)]}, str(tmp / "out2"), progress=False)
  p = build_qa_dataset([fx("flashrag.jsonl")], str(tmp / "out3"), name="x", version="2.0.1",
                       progress=False)
  assert p.endswith(os.path.join("x", "2.0.1"))
  p = build_qa_dataset([fx("r1_searcher.jsonl")], str(tmp / "out3"), name="x", version="2.0.1",
                       progress=False, overwrite=True)
  from asearcher_jax.data import open_qa_dataset
  assert [i.qid for i in open_qa_dataset(p, "train")] == ["r1_searcher_1", "r1_searcher_2"]


def test_tfds_build_names_flashrag_files_by_folder_and_a_failed_rebuild_keeps_the_old(
    tmp_path, monkeypatch):
  from asearcher_jax.data import build_qa_dataset, load_datasets, open_qa_dataset, tfds_builder
  paths = []
  for ds in ("nq", "triviaqa"):
    (tmp_path / ds).mkdir()
    paths.append(str(tmp_path / ds / "test.jsonl"))
    with open(paths[-1], "w") as f:
      f.write(json.dumps({"id": "test_0", "question": f"{ds}?", "golden_answers": ["x"]}) + "\n")
  path = build_qa_dataset({"test": paths}, str(tmp_path / "out"), progress=False)
  assert [i.source for i in open_qa_dataset(path, "test")] == ["nq", "triviaqa"]
  items, _, _ = load_datasets([path])
  assert [(ds, it.qid) for ds, it in items] == [("nq", "test_0"), ("triviaqa", "test_0")]

  def broken(self, items):
    raise OSError("disk full")
    yield
  monkeypatch.setattr(tfds_builder._QABuilder, "_generate_examples", broken)
  with pytest.raises(Exception, match="disk full"):
    build_qa_dataset({"test": paths[:1]}, str(tmp_path / "out"), progress=False,
                     overwrite=True)
  assert len(open_qa_dataset(path, "test")) == 2  # as it was
  assert os.listdir(tmp_path / "out") == ["qa"]  # and the failed build left nothing
  monkeypatch.undo()
  # A rename into place that fails after the old one was moved aside puts the old one back.
  real = os.rename

  def rename(src, dst):
    if os.path.abspath(dst) == os.path.abspath(path) and ".qa.build-" in str(src) and (
        not str(src).endswith(".old")):  # the new dataset's move in, not the old one's back
      raise OSError("rename failed")
    return real(src, dst)
  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(OSError, match="rename failed"):
    build_qa_dataset({"test": paths[:1]}, str(tmp_path / "out"), progress=False,
                     overwrite=True)
  monkeypatch.undo()
  assert len(open_qa_dataset(path, "test")) == 2


def test_tfds_reading_does_not_import_tensorflow(built, tmp_path):
  """Read in a fresh interpreter where importing tensorflow would raise: proves the read path
  never imports it, even on hosts where TF happens to be installed."""
  path, expected, _, _ = built
  fake = tmp_path / "fake_tf" / "tensorflow"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('tensorflow must not be imported')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake_tf"), REPO]))
  proc = subprocess.run([sys.executable, "-c", READER, path], env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["tf"] == []
  for split in ("train", "test"):
    assert [QAItem.from_json(d) for d in out[split]] == expected[split]
  assert sorted(k for ix in out["shards"] for k in ix) == list(range(len(expected["train"])))
