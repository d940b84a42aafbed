def main() -> None:
    raise SystemExit("multimae-train: not yet available")
