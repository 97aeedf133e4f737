"""Prefect flows that wire the stages into on-policy rounds.

Prefect reads its settings from the environment when first imported, so the defaults that a
local, offline run needs are set here, before that import, without overriding the user's own.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The ephemeral API server (used by `trace-rl run` without a server) starts in ~5 s on an idle
# machine but can take far longer on a loaded one; Prefect's default of 20 s is too tight.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
