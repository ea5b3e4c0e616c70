from ggufkit.cli import main

# guarded: worker processes (kquants) import the main module under another name
if __name__ == "__main__":
    raise SystemExit(main())
