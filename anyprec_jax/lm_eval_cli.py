"""`lm_eval`'s command line with the `anyprec` model registered.

    python -m anyprec_jax.lm_eval_cli --model anyprec \\
        --model_args path=DIR,precision=4,batch_size=8 --tasks arc_easy,hellaswag
    anyprec-lm-eval ...   # the same, as the console script pyproject.toml installs

lm_eval 0.4.13 finds no third-party models by itself (its registry lists its own
models only, and it reads no entry-point group). The installed
`anyprec_jax_lm_eval.pth` (see `anyprec_jax_lm_eval_hook`) makes a plain
`lm_eval --model anyprec` work; this wrapper does not depend on it: it imports the
adapter, then hands every argument to lm_eval's own CLI unchanged.
"""

from __future__ import annotations


def main() -> None:
  """Registers `anyprec`, then runs `lm_eval` with sys.argv."""
  import sys
  from anyprec_jax import cli
  cli.quiet_startup()
  try:
    import anyprec_jax.lm_eval_adapter  # noqa: F401  (registers "anyprec")
    from lm_eval.__main__ import cli_evaluate
  except ImportError as e:
    sys.exit(f"anyprec-lm-eval: error: {e} (install lm-eval: pip install -e .[eval])")
  cli_evaluate()


if __name__ == "__main__":
  main()
