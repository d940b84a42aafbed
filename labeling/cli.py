def main() -> None:
    raise SystemExit("multimae-label: not yet available")
