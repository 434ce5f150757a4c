"""Networks: architecture only (loops, IO and metrics live elsewhere)."""
