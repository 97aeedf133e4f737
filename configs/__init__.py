"""The packaged run configs (YAML); `trace-rl run NAME` finds them here."""
