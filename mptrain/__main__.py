"""`python -m mptrain` (what torchrun needs) runs the same entry point as the `mptrain` command."""

from mptrain.cli.main import main

if __name__ == "__main__":
    main()
