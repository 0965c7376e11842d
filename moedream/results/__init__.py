"""Sample-efficiency results: per-run scores, across-seed statistics and a resumable runner."""
