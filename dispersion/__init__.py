"""dispersion: representation dispersion of language models, measured at scale.

The pure library (no Prefect or Ray imports): ``core`` (configs, storage, layout, catalog),
``measure`` (corpus, sampling, models, extraction, metrics, binning, scan), ``training``
(losses, trainer, checkpoints, zoo, fine-tuning, sweeps), ``report`` (figures, markdown),
``analyses`` (one module per step of paper 001) and, on top, ``config``/``run``/``cli``.
See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
