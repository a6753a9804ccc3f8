"""DVC stages: thin typer commands that read params.yaml, call `clso`, and write outputs."""
