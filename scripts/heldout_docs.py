"""Writes the documents of a calibration file that the Fisher pass did not use.

Evaluating on the local C4 *train* sample (the only C4 text in ../shared) would score
text the calibration saw; this keeps the documents that none of the given calibration
draws (same file, sample count, length, seeds as `quantize.py`) takes, as a .jsonl to
pass to `evaluate.py --datasets=<file>`.

  python scripts/heldout_docs.py --model=/tmp/q14b/hf \\
      --calibration=../shared/data/c4/c4_train_sample1000.jsonl --num_samples=100 \\
      --seq_len=512 --seeds=0,1 --output=/tmp/c4_heldout.jsonl
"""

import json
import pathlib

from absl import flags

from anyprec_jax import cli

_MODEL = flags.DEFINE_string("model", None, "Model directory (its tokenizer decides which "
                             "documents are long enough).", required=True)
_CALIBRATION = flags.DEFINE_string("calibration", None, "Calibration document file.",
                                   required=True)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 100, "Calibration samples per seed.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Calibration sample length (tokens).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Calibration seeds to exclude.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .jsonl ({\"text\": ...} per line).",
                              required=True)


def main(argv):
  del argv
  from anyprec_jax import evaluation
  from anyprec_jax.quantize import calibration
  from anyprec_jax.quantize.config import CalibrationConfig
  cfgs = [CalibrationConfig(dataset=_CALIBRATION.value, num_samples=_NUM_SAMPLES.value,
                            seq_len=_SEQ_LEN.value, seed=int(s)) for s in _SEEDS.value]
  docs = calibration.heldout_documents(cfgs, evaluation.load_tokenizer(_MODEL.value))
  out = pathlib.Path(_OUTPUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  print(f"{len(docs)} held-out documents -> {out}")


if __name__ == "__main__":
  cli.run(main)
