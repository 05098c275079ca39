"""Dataset adapters, one file each; importing this package registers all of them (data.source.ADAPTERS)."""

import data.synthetic  # noqa: F401  (registers "synthetic")
