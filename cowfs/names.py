"""The names cowfs takes for itself in a workspace's root, spelled here and nowhere else.

`.cowfs` is the store (hidden through the mount); `.snapshots` is the snapshot directory the
mount serves (a workspace that already has an entry of that name is refused). Bytes, as the
daemon's calls by descriptor take them; clients decode them.
"""

STORE_NAME = b".cowfs"
SNAPDIR = b".snapshots"
