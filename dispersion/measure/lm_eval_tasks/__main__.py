"""``python -m dispersion.measure.lm_eval_tasks``: print the folder to give lm-eval as ``--include_path``;
``--write`` draws the shipped queries again from this Python's embedded corpus."""

import sys

from dispersion.measure.lm_eval_tasks import PATH, write

if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    elif sys.argv[1:]:
        sys.exit(f"error: usage: python -m dispersion.measure.lm_eval_tasks [--write] (got {' '.join(sys.argv[1:])})")
    print(PATH)
