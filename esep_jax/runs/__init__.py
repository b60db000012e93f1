"""What a training run is on disk — the workdir's files, the train state, the checkpoint format — and
`TrainedRun`, the read-only way everything but the trainer uses a run."""
