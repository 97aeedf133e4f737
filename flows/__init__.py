"""Prefect flows that wire the stages into on-policy rounds.

Prefect reads its settings from the environment when first imported, so the defaults that a
local, offline run needs are set here, before that import, without overriding the user's own.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The ephemeral API server (used by `trace-rl run` without a server) starts in ~5 s on an idle
# machine but can take far longer on a loaded one; Prefect's default of 20 s is too tight.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Weight load and save bars ("Loading weights", "Writing model shards": transformers' bars, which
# follow huggingface_hub's switch) belong on a terminal; in a log (a Prefect worker, a file) each
# is a line of noise per load. Set before transformers is imported; worker processes inherit it.
if not os.isatty(2):
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
