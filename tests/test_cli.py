"""The `asearcher` command line, run as a user runs it (a subprocess per command)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
from conftest import child_env, single_device_mesh

from asearcher_jax.models import flat_params, from_pretrained

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY = ["model.arch.num_layers=2", "model.arch.hidden_size=64", "model.arch.intermediate_size=96"]


def asearcher(*args, check=True):
  env = child_env()
  proc = subprocess.run([sys.executable, "-m", "asearcher_jax.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  if check and proc.returncode:
    raise AssertionError(f"asearcher {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
  return proc


def test_init_convert_round_trip_and_generate(tmp_path):
  hf, orbax, back = tmp_path / "hf", tmp_path / "orbax", tmp_path / "back"
  out = asearcher("init-model", "--config", "configs/debug.yaml", "--out", str(hf), *TINY)
  assert "wrote qwen3 model" in out.stdout
  assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors", "tokenizer.json",
                                    "tokenizer_config.json"]
  asearcher("convert", str(hf), str(orbax))
  assert sorted(os.listdir(orbax)) == ["0", "tokenizer"]
  asearcher("convert", str(orbax), str(back), "--dtype", "bfloat16")
  assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"

  mesh = single_device_mesh()
  original = flat_params(from_pretrained(str(hf), mesh, tokenizer=False, progress=False)[0])
  via_orbax, tok, _ = from_pretrained(str(orbax), mesh, progress=False)
  for name, value in flat_params(via_orbax).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(original[name]), err_msg=name)
  assert tok.eos_id == 258

  gen = asearcher("generate", str(back), "--chat", "--prompt", "hello", "--max-new-tokens", "4",
                  "--quantization", "int8")
  n = int(re.search(r"completion \((\d+) tokens, float32, int8 matmul weights",
                    gen.stdout).group(1))
  assert 1 <= n <= 4  # a random model may emit <|im_end|> early


def test_convert_refuses_to_clobber(tmp_path):
  hf = tmp_path / "hf"
  asearcher("init-model", "--config", "configs/debug.yaml", "--out", str(hf), *TINY)
  proc = asearcher("init-model", "--config", "configs/debug.yaml", "--out", str(hf), *TINY,
                   check=False)
  assert proc.returncode == 2 and "already exists" in proc.stderr


def test_config_errors_exit_2_with_the_key(tmp_path):
  proc = asearcher("config", "--config", "configs/debug.yaml", "mesh.tensr=2", check=False)
  assert proc.returncode == 2
  assert "configs/debug.yaml + overrides: unknown key 'mesh.tensr'" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_train_refuses_a_learner_temperature_other_than_the_rollouts(tmp_path):
  proc = asearcher("train", "--config", "configs/debug.yaml", "agent.temperature=0.6",
                   f"run.output_dir={tmp_path / 'run'}", check=False)
  assert proc.returncode == 2
  assert "rl.temperature (1.0) must equal agent.temperature (0.6)" in proc.stderr
  assert not (tmp_path / "run").exists()  # refused before anything started


def test_config_prints_resolved_values():
  out = asearcher("config", "--config", "configs/debug.yaml", "model.arch.num_layers=3").stdout
  assert "num_layers: 3" in out and "fsdp: -1" in out


def test_overrides_are_taken_before_and_after_flags():
  """`asearcher train --resume rl.total_steps=30` (launch/debug.sh with RESUME=1 and an
  override) must not leave the override unparsed."""
  out = asearcher("config", "model.arch.num_layers=3", "--config", "configs/debug.yaml",
                  "mesh.tensor=1", "rl.total_steps=30").stdout
  assert "num_layers: 3" in out and "total_steps: 30" in out
  proc = asearcher("config", "--config", "configs/debug.yaml", "--bogus", "rl.total_steps=3",
                   check=False)
  assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def test_missing_checkpoint_directory(tmp_path):
  proc = asearcher("generate", str(tmp_path / "nope"), "--prompt", "x", check=False)
  assert proc.returncode == 2 and "no such directory" in proc.stderr


def test_serve_answers_openai_requests_and_stops_on_sigterm(tmp_path):
  import signal
  import urllib.request

  from asearcher_jax.procs import free_ports
  grpc_port, http_port = free_ports(2)
  env = child_env()
  proc = subprocess.Popen(
      [sys.executable, "-m", "asearcher_jax.cli", "serve", "--config", "configs/debug.yaml", *TINY,
       f"serve.grpc_port={grpc_port}", f"serve.http_port={http_port}", "serve.max_len=128"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert f"gRPC 127.0.0.1:{grpc_port}" in line, line + proc.stderr.read()
    body = json.dumps({"prompt": "hello", "max_tokens": 3, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", data=body)
    out = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert out["usage"]["completion_tokens"] <= 3 and out["model"] == "debug"
  finally:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
  assert "decode server stopped" in proc.stdout.read()


def test_eval_with_no_decode_server_reports_aborted_episodes(tmp_path):
  """Nothing listens: every episode ends `aborted`, the summary says why, exit status 1."""
  data = tmp_path / "qa.jsonl"
  data.write_text('{"question": "Where is Elosia?", "answer": ["nowhere"]}\n{"answer": ["x"]}\n')
  out = asearcher("eval", "--config", "configs/debug.yaml", "--data", str(data), "--k", "2",
                  "--out", str(tmp_path / "eval"), "--no-progress",
                  "eval.decode_address=127.0.0.1:9", "search.url=http://127.0.0.1:9", check=False)
  assert out.returncode == 1, out.stderr
  assert "line 2: missing or empty question" in out.stdout, out.stdout
  assert re.search(r"2 episodes aborted \(rerun to retry them\): decode server", out.stdout)
  report = json.loads((tmp_path / "eval" / "report.json").read_text())
  assert report["datasets"]["qa"]["status"] == {"aborted": 2} and report["skipped_rows"] == 1
  # A baseline to compare with is read first: a typo fails at once, not after the evaluation.
  typo = asearcher("eval", "--config", "configs/debug.yaml", "--data", str(data), "--out",
                   str(tmp_path / "eval2"), "--baseline", str(tmp_path / "nope.json"),
                   check=False)
  assert typo.returncode == 2 and "--baseline" in typo.stderr and "nope.json" in typo.stderr
  assert not (tmp_path / "eval2").exists()


def test_every_command_prints_its_help():
  """`asearcher X --help` for every command and subcommand (a stray % in one help text made
  argparse raise instead)."""
  import argparse
  import contextlib
  import io

  from asearcher_jax.cli import build_parser

  def commands(parser, path=()):
    for action in parser._actions:
      if isinstance(action, argparse._SubParsersAction):
        for name, sub in action.choices.items():
          yield path + (name,)
          yield from commands(sub, path + (name,))

  seen = list(commands(build_parser()))
  assert ("rollout",) in seen and len(seen) > 15
  for path in seen:
    with contextlib.redirect_stdout(io.StringIO()) as out, \
        contextlib.suppress(SystemExit):
      build_parser().parse_args([*path, "--help"])
    assert "usage: asearcher" in out.getvalue(), path


def test_data_build_makes_a_tfds_dataset(tmp_path):
  data = tmp_path / "qa.jsonl"
  data.write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2", "answer": ["a2"]}\n')
  out = asearcher("data", "build", "--split", f"test={data}", "--out", str(tmp_path / "ds"))
  path = out.stdout.strip().splitlines()[-1].removeprefix("dataset: ")
  from asearcher_jax.data import open_qa_dataset
  assert [it.question for it in open_qa_dataset(path, "test")] == ["q1", "q2"]


def test_convert_overwrites_only_a_checkpoint(tmp_path, capsys):
  """`convert --to orbax --overwrite` removed whatever directory it was given."""
  from asearcher_jax.cli import main
  dst = tmp_path / "notes"
  dst.mkdir()
  (dst / "mine.txt").write_text("keep")
  assert main(["convert", str(tmp_path / "src"), str(dst), "--to", "orbax", "--overwrite"]) == 2
  assert "holds files but no orbax checkpoint" in capsys.readouterr().err
  assert (dst / "mine.txt").read_text() == "keep"


def test_ctrl_c_while_train_starts_exits_130(tmp_path):
  """An interruption, not a usage error (2): a wrapper script tells the two apart."""
  import signal
  proc = subprocess.Popen(
      [sys.executable, "-m", "asearcher_jax.cli", "train", "--config", "configs/debug.yaml",
       f"run.output_dir={tmp_path / 'run'}", "--no-progress"],
      cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.startswith("run folder"), line + proc.stderr.read()
    proc.send_signal(signal.SIGINT)  # while it waits for its first server
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 130, out + err
  assert "interrupted while waiting for" in out + err
