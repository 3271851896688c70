"""The third-party chatter every `lorakit` command hides: lorakit says what matters itself.

transformers imports torchao (when installed) while loading a model; torchao then logs "Failed to load ....so" for
optional kernels built for another Python or GPU, and torch's pytree logs deprecations; transformers logs load
reports and draws progress bars. None of it says anything about the user's run. `main` quiets it once, before any
command runs, without importing anything: the loggers are set by name, and transformers and huggingface_hub read
their verbosity and progress-bar switches from the environment when imported (when already imported, they are
told directly). A user's own TRANSFORMERS_VERBOSITY or HF_HUB_DISABLE_PROGRESS_BARS is kept.
"""

from __future__ import annotations

import logging
import os
import sys

NOISY_LOGGERS = ("torchao", "torch.utils._pytree")  # warnings only; their errors still show


def quiet_third_party() -> None:
    """Silence the third-party loggers and progress bars that say nothing about the run (for this process)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:  # it read the environment when imported
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
