"""Named presets as Python functions; every recipe has a CPU-sized `debug` twin."""
