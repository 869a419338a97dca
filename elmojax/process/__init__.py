"""The process, at the bottom beside formats/: the process-wide settings that entry points
apply (`runtime.setup`, malloc's pad in hostmem), JAX's multi-controller start and barriers,
and how SIGINT and SIGTERM stop a command (`runtime.stop_on_signals`, `runtime.Stopped`)."""
