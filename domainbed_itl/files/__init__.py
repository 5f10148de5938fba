"""Files on disk: writing outputs, folder locks, the shipped data, run folders and sweep folders.

See docs/files.md.
"""
