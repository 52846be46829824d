"""What serves the method: streaming evaluation (eval), golden cases (golden), tiny-model training
(train), attention maps (viz), cache sizing (sizing), the command-line contract (cli), benchmarks (bench).
Each command runs as `python -m minisink COMMAND`."""
