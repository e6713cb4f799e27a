"""The ways to train: each returns a transferkit.run.Run."""
