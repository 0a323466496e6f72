"""One module per pipeline stage, each with a `main(params)` the CLI calls."""
