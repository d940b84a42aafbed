def main() -> None:
    raise SystemExit("multimae-shard: not yet available")
