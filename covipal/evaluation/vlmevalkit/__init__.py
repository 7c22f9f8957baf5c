"""VLMEvalKit (the `vlmeval` module of PyPI's ms-vlmeval) as covipal uses it: our model as one of its models, local
benchmark sets as its datasets, and one benchmark run through its inference and scoring.

Importing this package imports vlmeval without its process-wide side effects: vlmeval switches off TLS
certificate checks for every later HTTPS connection (restored here), logs an error on the root logger when it
finds no API-key `.env` file (silenced), switches off gradients for the whole process (`vlmeval.vlm` calls
`torch.set_grad_enabled(False)`: restored, so training in the same process still learns), and reads
`VLMEVALKIT_USE_MODELSCOPE` once, whose unset default means "use ModelScope", a network service (set to 0 unless
the user set it).
"""

from __future__ import annotations

import logging
import os
import ssl

import torch

from covipal.errors import CovipalError

os.environ.setdefault("VLMEVALKIT_USE_MODELSCOPE", "0")
_https_context = ssl._create_default_https_context
_grad_enabled = torch.is_grad_enabled()
logging.disable(logging.ERROR)
try:
    import vlmeval  # noqa: F401
    import vlmeval.vlm  # noqa: F401  (its import is the one that switches gradients off)
except ImportError as error:
    raise CovipalError(
        f"VLMEvalKit is not importable ({error}); install it as scripts/setup.sh does: pip install -e '.[eval]' "
        "&& pip install --no-deps ms-vlmeval==0.0.20"
    ) from None
finally:
    logging.disable(logging.NOTSET)
    ssl._create_default_https_context = _https_context
    torch.set_grad_enabled(_grad_enabled)
