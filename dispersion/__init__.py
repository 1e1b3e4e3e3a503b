"""dispersion: representation dispersion of language models, measured at scale.

The pure library: no Prefect or Ray imports here (see ARCHITECTURE in docs/).
"""

__version__ = "0.1.0"

# The config models are completed by option models that live beside their analyses
# (gap, clusters, finetune, condensation, revisions), which import config's base types:
# loading config first makes every import order work (``import dispersion.gap`` alone too).
from dispersion import config as _config  # noqa: E402,F401
