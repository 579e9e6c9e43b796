"""Sessions: one continuous video per session id, appended clip by clip (stitcher, store)."""
