"""The victims: vision-language models to tune, query and attack (`LlavaVictim`, `HFVictim`, `FlamingoVictim`).

Importing the package turns off transformers' own tqdm bars ("Loading weights", "Writing model
shards") and, through it, huggingface_hub's: they would interleave with our rich bars on stderr
(`vlmsec.progress`) whenever a victim is loaded or saved.
"""

from transformers.utils import logging as _transformers_logging

_transformers_logging.disable_progress_bar()  # also calls huggingface_hub.utils.disable_progress_bars
