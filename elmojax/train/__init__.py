"""Training, above model/ and data/: the step's math (step), host batches onto devices
(batch), the mesh and compiled steps (trainer), the loop (loop), heldout perplexity and the
model's health (evaluation), checkpoints (checkpoint), the run's stored config (runconfig),
the workdir's lock (workdir), metrics (metrics, tensorboard) and trained models in and out
(trained_models). Nothing here imports infer/."""
