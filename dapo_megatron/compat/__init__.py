"""Every monkeypatch of a third-party package, in one quarantined package (being moved here)."""
