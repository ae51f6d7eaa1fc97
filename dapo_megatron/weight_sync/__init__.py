"""Per-step actor -> engine weight resharding: gather, rename, bucket, push. Issue 5."""
