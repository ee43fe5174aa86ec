"""lm-eval's own command line with the `lit_moe` model registered.

    python -m evaluation --model lit_moe --model_args checkpoint=last.ckpt,batch_size=32 \
        --tasks core_copa --include_path tasks/        # YAMLs from `cli.py evaluate --export_lm_eval tasks/`

lm-eval finds models only in its registry and has no plug-in discovery, so this module
imports the adapter (which registers itself) and then hands every flag to lm-eval.
"""

from __future__ import annotations


def main() -> None:
    import evaluation.adapter  # noqa: F401  (registers "lit_moe")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
