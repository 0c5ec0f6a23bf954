"""Loaders of the tiny local lm_eval tasks (JSON Lines files beside this module).

`custom_dataset: !function tiny_tasks.load_mc` in a task YAML; lm_eval calls it with the
task's metadata and dataset_kwargs, and uses the returned {split: Dataset}.
"""

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
  with open(HERE / name, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _split(name: str):
  import datasets  # Local: lm_eval imports this module while it reads the YAML.
  return {"test": datasets.Dataset.from_list(_rows(name))}


def load_mc(**kwargs):
  """tiny_mc.jsonl: {"question", "choices": [4 strings], "label": int} per line."""
  del kwargs
  return _split("tiny_mc.jsonl")


def load_gen(**kwargs):
  """tiny_gen.jsonl: {"prompt", "answer"} per line."""
  del kwargs
  return _split("tiny_gen.jsonl")
