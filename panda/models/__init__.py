"""Model shapes (presets), loading helpers and pipeline layer specs."""
